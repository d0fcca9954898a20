"""The typed on-ready intent of a revision (its stored text form, old records included) and
the one traffic formatter (TrafficTarget objects and the API's JSON alike)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from torpor.model import Function, OnReady, Revision, Spec, TrafficTarget, format_traffic

# -- OnReady ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "percent"),
    [
        ("promote", "promote", None),
        ("none", "none", None),
        ("canary:1", "canary", 1),
        ("canary:10", "canary", 10),
        ("canary:99", "canary", 99),
    ],
)
def test_text_form_round_trips(text: str, kind: str, percent: int | None) -> None:
    intent = OnReady.parse(text)
    assert (intent.kind, intent.percent) == (kind, percent)
    assert str(intent) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Promote",
        "promote:",
        "none:5",
        "canary",
        "canary:",
        "canary:0",
        "canary:100",
        "canary:-5",
        "canary:1e1",
        "canary:１０",  # fullwidth digits: isdigit() but not ASCII
        "canary:007",
        "canary: 10",
        "rollout:10",
    ],
)
def test_malformed_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="on_ready"):
        OnReady.parse(text)


@pytest.mark.parametrize(
    ("kind", "percent"),
    [("canary", None), ("canary", 0), ("canary", 100), ("canary", True), ("promote", 10)],
)
def test_invalid_combinations_are_refused(kind: Any, percent: Any) -> None:
    with pytest.raises(ValueError, match="on_ready"):
        OnReady(kind, percent)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="on_ready"):
        OnReady("rollout")  # type: ignore[arg-type]


def _revision(on_ready: OnReady) -> Revision:
    return Revision(
        name="fn-00001", function="fn", number=1, spec=Spec(name="fn"), on_ready=on_ready
    )


@pytest.mark.parametrize("intent", [OnReady(), OnReady("none"), OnReady.canary(25)])
def test_stored_as_the_text_every_version_reads(intent: OnReady) -> None:
    stored = json.loads(json.dumps(_revision(intent).to_dict()))
    assert stored["on_ready"] == str(intent)  # what older versions write and parse
    assert Revision.from_dict(stored).on_ready == intent


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ("promote", OnReady()),
        ("none", OnReady("none")),
        ("canary:10", OnReady.canary(10)),
    ],
)
def test_old_function_records_load(stored: str, expected: OnReady) -> None:
    """A function record as an older version wrote it (on_ready as a plain string)."""
    record = {
        "name": "fn",
        "revisions": [
            {
                "name": "fn-00001",
                "function": "fn",
                "number": 1,
                "spec": {"name": "fn"},
                "status": "building",
                "on_ready": stored,
                "tag": "canary",
            }
        ],
        "traffic": [],
    }
    fn = Function.from_dict(json.loads(json.dumps(record)))
    assert fn.revisions[0].on_ready == expected
    assert fn.to_dict()["revisions"][0]["on_ready"] == stored


@pytest.mark.parametrize("stored", [None, "canary:abc", "canary:150", "", 7, {"kind": "x"}])
def test_a_malformed_stored_value_loads_as_promote(stored: Any) -> None:
    """What the controller always did with an intent it did not know: promote."""
    d = _revision(OnReady()).to_dict()
    d["on_ready"] = stored
    assert Revision.from_dict(d).on_ready == OnReady()


def test_a_record_without_the_field_loads_as_promote() -> None:
    d = _revision(OnReady.canary(5)).to_dict()
    del d["on_ready"]
    assert Revision.from_dict(d).on_ready == OnReady()


def test_constructor_takes_the_text_form_strictly() -> None:
    rev = Revision(
        name="a-00001", function="a", number=1, spec=Spec(name="a"), on_ready="canary:10"
    )  # type: ignore[arg-type]
    assert rev.on_ready == OnReady.canary(10)
    with pytest.raises(ValueError, match="on_ready"):
        Revision(name="a-00001", function="a", number=1, spec=Spec(name="a"), on_ready="canary:x")  # type: ignore[arg-type]


# -- format_traffic --------------------------------------------------------------------------

TABLE = [
    ("a-00002", 90, "stable"),
    ("a-00003", 10, None),
    ("a-00001", 0, "old"),
]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, "a-00002=90% (stable), a-00003=10%, a-00001=0% (old)"),
        ({"skip_zero": True, "tags": False}, "a-00002=90%, a-00003=10%"),
        ({"skip_zero": True}, "a-00002=90% (stable), a-00003=10%"),
        ({"tags": False}, "a-00002=90%, a-00003=10%, a-00001=0%"),
    ],
)
def test_format_traffic_objects_and_json_alike(options: dict[str, bool], expected: str) -> None:
    objects = [TrafficTarget(r, p, t) for r, p, t in TABLE]
    dicts = [{"revision": r, "percent": p, "tag": t} for r, p, t in TABLE]
    assert format_traffic(objects, **options) == expected
    assert format_traffic(dicts, **options) == expected


def test_format_traffic_json_without_a_tag_key_and_empty_table() -> None:
    assert format_traffic([{"revision": "a-00001", "percent": 100}]) == "a-00001=100%"
    assert format_traffic([]) == ""
    assert format_traffic([TrafficTarget("a-00001", 0)], skip_zero=True) == ""

"""The bus payloads (torpor.messages): what the parsers keep, drop and refuse, as tables,
and that what the gateway builds is what the control plane reads back."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import pytest

from torpor.autoscaler.service import Autoscaler
from torpor.gateway.routes import RouteTable
from torpor.gateway.stats import Sampler
from torpor.gateway.upstream import Pools
from torpor.messages import LATENCY_SLOTS, MAX_COUNT, parse_poke, parse_stats
from torpor.model import Function, Replica, Revision, Scale, Spec, TrafficTarget

GOOD_ENTRY: dict[str, Any] = {
    "function": "fn",
    "concurrency": 1.5,
    "requests": 3,
    "errors": 1,
    "latency": [3] + [0] * (LATENCY_SLOTS - 1),
    "ready": 1,
    "queued": 0,
}
ZEROS = [0] * LATENCY_SLOTS


def report(entry: object, **top: object) -> dict[str, Any]:
    return {"gateway": "gw-1", "time": 1.0, "revisions": {"fn-00001": entry}, **top}


def with_(**fields: object) -> dict[str, Any]:
    return {**GOOD_ENTRY, **fields}


def without(name: str) -> dict[str, Any]:
    return {k: v for k, v in GOOD_ENTRY.items() if k != name}


# -- a whole stats report: kept, or dropped whole ------------------------------------------


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (None, "not an object"),
        ([1, 2], "not an object"),
        ("stats", "not an object"),
        (report(GOOD_ENTRY, gateway=7), "gateway"),
        (report(GOOD_ENTRY, gateway="g" * 300), "gateway"),
        (report(GOOD_ENTRY, time=math.nan), "time"),
        (report(GOOD_ENTRY, time=math.inf), "time"),
        (report(GOOD_ENTRY, time=-1.0), "time"),
        (report(GOOD_ENTRY, time="now"), "time"),
        ({"gateway": "gw-1", "revisions": ["fn-00001"]}, "revisions"),
    ],
)
def test_a_malformed_stats_report_is_dropped_whole_with_a_log_line(
    payload: object, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="torpor.messages"):
        assert parse_stats(payload) is None
    assert len(caplog.records) == 1 and why in caplog.records[0].getMessage()


# -- one entry: kept (normalised) or dropped alone -----------------------------------------


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("1.5", "not an object"),
        (without("concurrency"), "concurrency"),
        (without("requests"), "requests"),
        (with_(concurrency=math.nan), "concurrency"),
        (with_(concurrency=math.inf), "concurrency"),
        (with_(concurrency=-0.5), "concurrency"),
        (with_(concurrency="3"), "concurrency"),
        (with_(concurrency=True), "concurrency"),
        (with_(concurrency=float(MAX_COUNT) * 4), "concurrency"),
        (with_(requests=-1), "requests"),
        (with_(requests=2.5), "requests"),
        (with_(requests="many"), "requests"),
        (with_(requests=10**400), "requests"),
        (with_(requests=False), "requests"),
        (with_(errors=-3), "errors"),
        (with_(errors=math.nan), "errors"),
        (with_(ready=math.inf), "ready"),
        (with_(queued=-1), "queued"),
        (with_(latency="0,1"), "latency"),
        (with_(latency=[1, -1]), "latency"),
        (with_(latency=[1, math.nan]), "latency"),
        (with_(latency=[1, None]), "latency"),
        (with_(function=["fn"]), "function"),
    ],
)
def test_a_malformed_entry_is_dropped_alone_with_a_log_line(
    entry: object, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    payload = report(entry)
    payload["revisions"]["good-00001"] = GOOD_ENTRY
    with caplog.at_level(logging.WARNING, logger="torpor.messages"):
        parsed = parse_stats(payload)
    assert parsed is not None and list(parsed["revisions"]) == ["good-00001"]
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "fn-00001" in message and why in message


@pytest.mark.parametrize(
    ("entry", "field", "expected"),
    [
        (GOOD_ENTRY, "concurrency", 1.5),
        (with_(concurrency=2), "concurrency", 2.0),  # an int is a number
        (with_(requests=4.0), "requests", 4),  # a whole float is a count
        (with_(requests=MAX_COUNT), "requests", MAX_COUNT),
        ({"concurrency": 1.0, "requests": 1}, "errors", 0),  # optional fields: their zero
        ({"concurrency": 1.0, "requests": 1}, "ready", 0),
        ({"concurrency": 1.0, "requests": 1}, "queued", 0),
        ({"concurrency": 1.0, "requests": 1}, "function", ""),
        ({"concurrency": 1.0, "requests": 1}, "latency", ZEROS),
        (with_(latency=None), "latency", ZEROS),
        (with_(latency=[1, 2]), "latency", [1, 2] + [0] * (LATENCY_SLOTS - 2)),
        # a gateway with more buckets: the extra ones are ignored
        (with_(latency=[1] * (LATENCY_SLOTS + 3)), "latency", [1] * LATENCY_SLOTS),
    ],
)
def test_an_entry_is_normalised(entry: dict[str, Any], field: str, expected: object) -> None:
    parsed = parse_stats(report(entry))
    assert parsed is not None
    got = parsed["revisions"]["fn-00001"][field]  # type: ignore[literal-required]
    assert got == expected and type(got) is type(expected)


def test_a_parsed_report_holds_only_its_fields_and_parses_to_itself() -> None:
    payload = report(with_(extra="x" * 1000), extra={"a": 1})
    parsed = parse_stats(payload)
    assert parsed is not None
    assert set(parsed) == {"gateway", "time", "revisions"}
    assert set(parsed["revisions"]["fn-00001"]) == set(GOOD_ENTRY)
    assert parse_stats(parsed) == parsed
    assert parse_stats({}) == {"gateway": "", "time": 0.0, "revisions": {}}


# -- pokes ---------------------------------------------------------------------------------

POKE = {"function": "fn", "revision": "fn-00001", "queued": 3, "gateway": "gw-1"}


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (None, "not an object"),
        ("poke", "not an object"),
        ({**POKE, "function": ""}, "function"),
        ({k: v for k, v in POKE.items() if k != "function"}, "function"),
        ({**POKE, "revision": 12}, "revision"),
        ({**POKE, "revision": "r" * 300}, "revision"),
        ({**POKE, "queued": math.nan}, "queued"),
        ({**POKE, "queued": math.inf}, "queued"),
        ({**POKE, "queued": -1}, "queued"),
        ({**POKE, "queued": 1.5}, "queued"),
        ({**POKE, "queued": "7"}, "queued"),
        ({**POKE, "queued": True}, "queued"),
        ({**POKE, "gateway": {"id": 1}}, "gateway"),
    ],
)
def test_a_malformed_poke_is_dropped_with_a_log_line(
    payload: object, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="torpor.messages"):
        assert parse_poke(payload) is None
    assert len(caplog.records) == 1 and why in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (POKE, POKE),
        ({**POKE, "queued": None}, {**POKE, "queued": 0}),  # a wake without a count
        ({k: v for k, v in POKE.items() if k != "queued"}, {**POKE, "queued": 0}),
        ({k: v for k, v in POKE.items() if k != "gateway"}, {**POKE, "gateway": ""}),
        ({**POKE, "queued": 2.0, "extra": 1}, {**POKE, "queued": 2}),
    ],
)
def test_a_poke_is_normalised(payload: dict[str, Any], expected: dict[str, Any]) -> None:
    assert parse_poke(payload) == expected


# -- the gateway builds what the control plane reads -----------------------------------------


def test_the_gateways_report_survives_the_bus_and_the_parser_whole() -> None:
    rev = Revision(name="f-00001", function="f", number=1, spec=Spec(name="f"), status="ready")
    fn = Function(name="f", revisions=[rev], traffic=[TrafficTarget("f-00001", 100)])
    replica = Replica(
        name="f-00001-r1", function="f", revision="f-00001", state="ready", endpoint="127.0.0.1:9"
    )
    table = RouteTable(Pools(), lambda *a: None)
    table.apply("f", fn, [replica])
    rr = table.revisions["f-00001"]
    rr.stats.observe(200, 0.02)
    rr.stats.observe(503, 7.0)
    entries = Sampler(table).collect({"f-00001": 4.0}, 2)
    sent = {"gateway": "gw-1", "time": 1.0, "revisions": entries}
    parsed = parse_stats(json.loads(json.dumps(sent)))  # as the Redis bus carries it
    assert parsed == sent
    entry = parsed["revisions"]["f-00001"]
    assert (entry["concurrency"], entry["requests"], entry["errors"], entry["ready"]) == (
        2.0,
        2,
        1,
        1,
    )
    scaler = Autoscaler(clock=lambda: 100.0)
    scaler.observe(parsed, lambda name: Scale())
    assert scaler.fresh == {"f-00001"}


def test_the_autoscaler_records_nothing_of_a_hostile_report() -> None:
    scaler = Autoscaler(clock=lambda: 100.0)
    hostile = {"gateway": "g", "revisions": {"a-00001": with_(concurrency=math.inf)}}
    scaler.observe(hostile, lambda name: Scale())
    scaler.observe("not a report", lambda name: Scale())
    scaler.observe({"revisions": {"b-00001": GOOD_ENTRY}}, lambda name: Scale())
    assert scaler.fresh == {"b-00001"}

"""Which function owns a revision is looked up in the controller's table of functions
(indexed as functions are synced, replaced or removed), never guessed from the
revision's name: a gateway report names revisions only."""

from __future__ import annotations

import pytest
from fakes import Clock, NullDriver

from torpor.controller.reconcile import Controller, FunctionTable
from torpor.model import Function, Revision, Scale, ScaleOverride, Spec
from torpor.store.embedded import EmbeddedStore


def _fn(name: str, *revisions: str, max_: int = 20) -> Function:
    revs = [
        Revision(name=r, function=name, number=i + 1, spec=Spec(name=name, scale=Scale(max=max_)))
        for i, r in enumerate(revisions)
    ]
    return Function(name=name, revisions=revs)


@pytest.mark.parametrize(
    ("functions", "revision", "owner"),
    [
        ({"hello": _fn("hello", "hello-00001")}, "hello-00001", "hello"),
        # names that a split at the last "-" gets wrong: the owner is who lists it
        ({"a-b": _fn("a-b", "a-b-00001"), "a": _fn("a", "a-00001")}, "a-b-00001", "a-b"),
        ({"api": _fn("api", "api-v2-canary")}, "api-v2-canary", "api"),
        ({"api": _fn("api", "api-00001")}, "api-v2-00001", None),
        ({}, "hello-00001", None),
        ({"hello": _fn("hello", "hello-00001")}, "", None),
    ],
)
def test_the_owner_of_a_revision(
    functions: dict[str, Function], revision: str, owner: str | None
) -> None:
    table = FunctionTable(functions)
    got = table.owner(revision)
    assert (got.name if got else None) == owner


def test_the_index_follows_replacements_and_removals() -> None:
    table = FunctionTable()
    table["hello"] = _fn("hello", "hello-00001", "hello-00002")
    table["hello"] = _fn("hello", "hello-00002", "hello-00003")  # 00001 collected
    assert table.owner("hello-00001") is None
    assert table.owner("hello-00003") is table["hello"]
    assert table.pop("hello").name == "hello"
    assert table.owner("hello-00002") is None and table.pop("hello", None) is None
    table["x"] = _fn("x", "x-00001")
    del table["x"]
    assert table.owner("x-00001") is None and dict(table) == {}


def test_a_report_reaches_the_scale_of_the_function_that_owns_the_revision() -> None:
    ctl = Controller(EmbeddedStore(None), NullDriver(), clock=Clock())  # type: ignore[arg-type]
    # a plain dict assigned (as a sync does) is indexed too
    ctl.functions = {
        "api": _fn("api", "api-v2-canary", max_=3),
        "api-v2": _fn("api-v2", "api-v2-00001", max_=7),
    }
    ctl.functions["api"].scale = ScaleOverride(max=4)
    scale = ctl._scale_of("api-v2-canary")
    assert scale is not None and scale.max == 4  # api's, not a function called "api-v2"
    other = ctl._scale_of("api-v2-00001")
    assert other is not None and other.max == 7
    assert ctl._scale_of("nobody-00001") is None

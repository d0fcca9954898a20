"""``spec._bounded`` / ``spec._within``: the one check behind every bounded number of a
``torpor.yaml``. Hostile values (booleans, strings, NaN, infinity, huge integers,
negatives, values just past a bound) are refused with a message naming the field and the
bound; what is inside comes back with its type."""

from __future__ import annotations

import math
from typing import Any

import pytest

from torpor.spec import SpecError, _bounded, _within, parse_spec

WORDS = "an integer from 1 to 10"


@pytest.mark.parametrize(
    ("value", "integer", "above", "expected"),
    [
        (1, True, False, 1),
        (10, True, False, 10),
        (5.0, True, False, 5),  # a whole float is an integer
        (1, False, False, 1.0),
        (0.5, False, True, 0.5),
        (10.0, False, True, 10.0),
    ],
)
def test_bounded_inside(value: Any, integer: bool, above: bool, expected: float) -> None:
    low = 0 if above else 1
    got = (
        _bounded(value, "f", WORDS, low, 10, integer=True, above=above)
        if integer
        else _bounded(value, "f", WORDS, low, 10, above=above)
    )
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize(
    ("value", "integer", "above", "shown"),
    [
        (True, True, False, "true"),
        (False, False, False, "false"),
        ("5", True, False, "'5'"),
        ("5", False, False, "'5'"),
        (None, False, False, "null"),
        ([5], True, False, "a list"),
        (math.nan, False, False, "nan"),
        (math.nan, True, False, "nan"),
        (math.inf, False, False, "inf"),
        (-math.inf, True, False, "-inf"),
        (10**400, False, False, "a very large integer"),
        (10**400, True, False, "a very large integer"),
        (-1, True, False, "-1"),
        (0, True, False, "0"),
        (11, True, False, "11"),
        (10.5, False, False, "10.5"),
        (2.5, True, False, "2.5"),  # not whole
        (0, False, True, "0"),  # the low bound is excluded
        (0.0, False, True, "0.0"),
        (-0.0, False, True, "-0.0"),
    ],
)
def test_bounded_refuses_naming_the_field_and_the_bound(
    value: Any, integer: bool, above: bool, shown: str
) -> None:
    low = 0 if above else 1
    with pytest.raises(SpecError) as err:
        if integer:
            _bounded(value, "scale.thing", WORDS, low, 10, integer=True, above=above)
        else:
            _bounded(value, "scale.thing", WORDS, low, 10, above=above)
    assert str(err.value) == f"scale.thing: expected {WORDS}, got {shown}"
    assert err.value.path == "scale.thing"


@pytest.mark.parametrize(
    ("number", "above", "inside"),
    [
        (0.0, False, True),
        (0.0, True, False),
        (5.0, True, True),
        (5.5, False, False),
        (math.nan, False, False),
    ],
)
def test_within(number: float, above: bool, inside: bool) -> None:
    if inside:
        assert _within(number, "raw", "p", "w", 0, 5, above=above) == number
    else:
        with pytest.raises(SpecError, match=r"^p: expected w, got 'raw'$"):
            _within(number, "raw", "p", "w", 0, 5, above=above)


# every field that goes through them, with a hostile value: the message names the field
# and says the bound (the words are the ones the spec always used)
FIELDS = [
    ({"port": True}, "port: expected an integer from 1 to 65535, got true"),
    ({"port": 65536}, "port: expected an integer from 1 to 65535, got 65536"),
    ({"timeout": 601}, "timeout: expected a duration > 0 and <= 600s, got 601"),
    ({"timeout": "0s"}, "timeout: expected a duration > 0 and <= 600s, got '0s'"),
    ({"max_body": 0}, 'max_body: expected a size from 1 byte to "1Gi", got 0'),
    ({"stream_idle": "2h"}, "stream_idle: expected a duration > 0 and <= 1h, got '2h'"),
    ({"max_connection": "25h"}, "max_connection: expected a duration > 0 and <= 24h, got '25h'"),
    (
        {"scale": {"target": math.nan}},
        "scale.target: expected a number > 0 and <= 10000 (in-flight requests per replica), got nan",
    ),
    (
        {"scale": {"concurrency": -1}},
        "scale.concurrency: expected an integer from 0 to 10000 (0 = no limit), got -1",
    ),
    ({"scale": {"idle": "25h"}}, "scale.idle: expected a duration from 0 to 24h, got '25h'"),
    ({"scale": {"window": 5}}, "scale.window: expected a duration from 6s to 1h, got 5"),
    (
        {"scale": {"panic_window": math.inf}},
        "scale.panic_window: expected a percent of scale.window from 1 to 100, got inf",
    ),
    (
        {"scale": {"panic_threshold": 109.9}},
        "scale.panic_threshold: expected a percent of the ready replicas from 110 to 1000, got 109.9",
    ),
    (
        {"resources": {"memory": "15Mi"}},
        'resources.memory: expected a size from "16Mi" to "64Gi", got \'15Mi\'',
    ),
    ({"rollout": {"interval": 0}}, "rollout.interval: expected a duration > 0 and <= 24h, got 0"),
    (
        {"rollout": {"max_error_ratio": "0.1"}},
        "rollout.max_error_ratio: expected a number from 0 to 1 (share of canary requests that may fail), got '0.1'",
    ),
    (
        {"rollout": {"max_p95_ratio": 0.5}},
        "rollout.max_p95_ratio: expected a number from 1 to 1000 (canary p95 / stable p95), got 0.5",
    ),
    (
        {"rollout": {"min_requests": 10**400}},
        "rollout.min_requests: expected an integer from 0 to 1000000, got a very large integer",
    ),
    (
        {"rollout": {"steps": [0, 100]}},
        "rollout.steps[0]: expected an integer percent from 1 to 100, got 0",
    ),
    (
        {"async": {"concurrency": False}},
        "async.concurrency: expected an integer from 1 to 1000 (calls running at once), got false",
    ),
    (
        {"async": {"max_attempts": 21}},
        "async.max_attempts: expected an integer from 1 to 20, got 21",
    ),
]


@pytest.mark.parametrize(("doc", "message"), FIELDS)
def test_each_bounded_field_refuses_with_its_field_and_bound(
    doc: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "a", **doc})
    assert str(err.value) == message

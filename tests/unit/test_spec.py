"""torpor.spec: every rule of torpor.yaml, good values and bad ones, by field path."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from torpor.model import MiB, Resources, RolloutPolicy, Scale, Spec
from torpor.spec import (
    SpecError,
    format_duration,
    format_size,
    load_spec,
    parse_duration,
    parse_size,
    parse_spec,
    spec_to_yaml_dict,
    validate_name,
    validate_tag,
)

GiB = 1024 * MiB


def spec_with(**overrides: Any) -> dict[str, Any]:
    """A minimal valid document with top-level keys replaced."""
    data: dict[str, Any] = {"name": "hello"}
    data.update(overrides)
    return data


def refused(data: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return info.value


# --- SpecError ----------------------------------------------------------------------------


def test_spec_error_is_a_value_error_with_path_and_expected() -> None:
    err = refused(spec_with(scale={"min": 1, "max": -3}))
    assert issubclass(SpecError, ValueError)
    assert err.path == "scale.max"
    assert err.expected == "an integer >= scale.min (1)"
    assert str(err) == "scale.max: expected an integer >= scale.min (1), got -3"


@pytest.mark.parametrize(
    "data",
    [
        spec_with(name="x" * 10_000),
        spec_with(handler="h" * 10_000),
        spec_with(timeout="9" * 10_000 + "s"),
        spec_with(port=10**5000),  # str() of this int would raise in Python >= 3.11
        spec_with(env={"A" * 10_000 + "-": "v"}),
        spec_with(**{"k" * 10_000: 1}),
        spec_with(resources={"memory": "1" * 10_000}),
    ],
    ids=["name", "handler", "timeout", "huge-int", "env-key", "unknown-key", "memory"],
)
def test_messages_never_echo_huge_values(data: dict[str, Any]) -> None:
    err = refused(data)
    assert len(str(err)) < 400
    assert "x" * 100 not in str(err) and "9" * 100 not in str(err)
    assert "A" * 100 not in str(err) and "k" * 100 not in str(err)


# --- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (30, 30.0),
        (1.5, 1.5),
        ("0s", 0.0),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        ("1h2m3s500ms", 3723.5),
        ("2h30m", 9000.0),
        ("0.5m", 30.0),
        (" 30s ", 30.0),
    ],
)
def test_parse_duration_good(value: Any, seconds: float) -> None:
    assert parse_duration(value, "timeout") == pytest.approx(seconds)
    assert isinstance(parse_duration(value, "timeout"), float)


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        None,
        -1,
        -0.5,
        math.nan,
        math.inf,
        "",
        "   ",
        "abc",
        "30",  # a string needs a unit
        "-1s",
        "1d",
        "30S",
        "1s1m",  # units largest first
        "1m1m",
        "1.s",
        ".5s",
        "1m 30s",
        "s",
        [30],
        {"s": 30},
    ],
)
def test_parse_duration_bad(value: Any) -> None:
    with pytest.raises(SpecError) as info:
        parse_duration(value, "scale.idle")
    assert info.value.path == "scale.idle"
    assert str(info.value).startswith("scale.idle: expected a non-negative duration")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.5, "500ms"),
        (0.1, "100ms"),
        (1.5, "1.5s"),
        (30, "30s"),
        (90, "1m30s"),
        (600, "10m"),
        (3600, "1h"),
        (3661, "1h1m1s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text, "x") == seconds


def test_format_duration_falls_back_to_an_exact_number() -> None:
    for seconds in (1 / 3, 0.123456789, 1e-9, 123.000001):
        out = format_duration(seconds)
        assert parse_duration(out, "x") == seconds


# --- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (1024, 1024),
        (1024.0, 1024),
        ("1048576", MiB),
        ("256Mi", 256 * MiB),
        ("1Gi", GiB),
        ("512Ki", 512 * 1024),
        ("1Ti", 1024 * GiB),
        ("128M", 128_000_000),
        ("1G", 1_000_000_000),
        ("1T", 10**12),
        ("100k", 100_000),
        ("100K", 100_000),
        ("0.5Gi", GiB // 2),
        ("1.5k", 1500),
        (" 1Gi ", GiB),
    ],
)
def test_parse_size_good(value: Any, size: int) -> None:
    out = parse_size(value, "resources.memory")
    assert out == size and type(out) is int


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        None,
        -1,
        "-1Mi",
        1.5,
        math.nan,
        "",
        "abc",
        "256MB",
        "256MiB",
        "256mi",
        "1.5",
        "1.0001k",
        "Mi",
        "1 Gi",
        [1],
        {"Mi": 1},
    ],
)
def test_parse_size_bad(value: Any) -> None:
    with pytest.raises(SpecError) as info:
        parse_size(value, "resources.memory")
    assert info.value.path == "resources.memory"
    assert str(info.value).startswith("resources.memory: expected ")


@pytest.mark.parametrize(
    ("size", "out"),
    [
        (256 * MiB, "256Mi"),
        (GiB, "1Gi"),
        (1536 * MiB, "1536Mi"),
        (1024 * GiB, "1Ti"),
        (512 * 1024, "512Ki"),
        (16 * MiB + 1, 16 * MiB + 1),
        (0, 0),
    ],
)
def test_format_size(size: int, out: Any) -> None:
    assert format_size(size) == out
    assert parse_size(out, "x") == size


# --- names and tags -------------------------------------------------------------------------

GOOD_LABELS = ["a", "hello", "hello-world", "a1", "a-b-c", "a--b", "x" * 63, "canary"]
BAD_LABELS = [
    "",
    "A",
    "Hello",
    "1abc",
    "-abc",
    "abc-",
    "x" * 64,
    "a_b",
    "a.b",
    "a b",
    "héllo",
    "hello\n",
    None,
    1,
    True,
    ["a"],
]


@pytest.mark.parametrize("value", GOOD_LABELS)
def test_validate_name_and_tag_good(value: str) -> None:
    assert validate_name(value) == value
    assert validate_tag(value) == value


@pytest.mark.parametrize("value", BAD_LABELS)
def test_validate_name_bad(value: Any) -> None:
    with pytest.raises(SpecError) as info:
        validate_name(value)
    assert info.value.path == "name"
    assert "DNS label" in info.value.expected


@pytest.mark.parametrize("value", BAD_LABELS)
def test_validate_tag_bad(value: Any) -> None:
    with pytest.raises(SpecError) as info:
        validate_tag(value)
    assert info.value.path == "tag"
    with pytest.raises(SpecError) as info:
        validate_tag(value, "traffic[0].tag")
    assert info.value.path == "traffic[0].tag"


# --- parse_spec: whole documents ------------------------------------------------------------


def test_minimal_spec_takes_model_defaults() -> None:
    assert parse_spec({"name": "hello"}) == Spec(name="hello")


def test_brief_example() -> None:
    doc = yaml.safe_load(
        """
name: hello
handler: handler:handle
env: {GREETING: hello}
port: 8080
timeout: 30s
scale:
  min: 0
  max: 20
  target: 10
  concurrency: 0
  idle: 30s
  window: 60s
resources: {cpu: 0.5, memory: 256Mi}
rollout:
  steps: [5, 50, 100]
  interval: 1m
  max_error_ratio: 0.01
  max_p95_ratio: 1.5
  min_requests: 50
"""
    )
    assert parse_spec(doc) == Spec(
        name="hello",
        handler="handler:handle",
        env={"GREETING": "hello"},
        port=8080,
        timeout=30.0,
        scale=Scale(min=0, max=20, target=10.0, concurrency=0, idle=30.0, window=60.0),
        resources=Resources(cpu=0.5, memory=256 * MiB),
        rollout=RolloutPolicy(
            steps=[5, 50, 100],
            interval=60.0,
            max_error_ratio=0.01,
            max_p95_ratio=1.5,
            min_requests=50,
        ),
    )


@pytest.mark.parametrize("data", [[], ["name"], "hello", 5, True])
def test_top_level_must_be_a_mapping(data: Any) -> None:
    err = refused(data)
    assert err.path == ""
    assert str(err).startswith("torpor.yaml: expected a mapping")


def test_empty_document_is_refused_naming_the_source() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(None, source="fn/torpor.yaml")
    assert info.value.path == "" and info.value.source == "fn/torpor.yaml"
    assert str(info.value).startswith("fn/torpor.yaml: the document is empty")


# (overrides of the minimal document, attribute path on the Spec, expected value)
GOOD = [
    ({"handler": "main:handle"}, "handler", "main:handle"),
    ({"handler": "app.api.v1:Handle_2"}, "handler", "app.api.v1:Handle_2"),
    ({"handler": None}, "handler", "handler:handle"),
    ({}, "handler", "handler:handle"),
    ({"image": "myorg/app:1.2"}, "handler", None),
    ({"image": "myorg/app:1.2"}, "image", "myorg/app:1.2"),
    ({"image": "python:3.12-slim"}, "image", "python:3.12-slim"),
    ({"image": "localhost:5000/team/app"}, "image", "localhost:5000/team/app"),
    ({"image": "app@sha256:" + "a" * 64}, "image", "app@sha256:" + "a" * 64),
    ({"image": "myorg/app:1.2", "handler": None}, "handler", None),
    ({"env": {"GREETING": "hello", "_X1": ""}}, "env", {"GREETING": "hello", "_X1": ""}),
    ({"env": {"DEBUG": True, "QUIET": False}}, "env", {"DEBUG": "true", "QUIET": "false"}),
    ({"env": {"N": 5, "F": 1.5, "lower": "x"}}, "env", {"N": "5", "F": "1.5", "lower": "x"}),
    ({"env": {"DAY": dt.date(2024, 1, 2)}}, "env", {"DAY": "2024-01-02"}),
    ({"env": None}, "env", {}),
    ({"env": {}}, "env", {}),
    ({"port": 1}, "port", 1),
    ({"port": 65535}, "port", 65535),
    ({"port": 9000.0}, "port", 9000),
    ({"port": None}, "port", 8080),
    ({"timeout": "500ms"}, "timeout", 0.5),
    ({"timeout": 600}, "timeout", 600.0),
    ({"timeout": "10m"}, "timeout", 600.0),
    ({"timeout": 0.001}, "timeout", 0.001),
    ({"scale": None}, "scale", Scale()),
    ({"scale": {}}, "scale", Scale()),
    ({"scale": {"min": 3}}, "scale.min", 3),
    ({"scale": {"min": 20}}, "scale.min", 20),
    ({"scale": {"min": 5, "max": 5}}, "scale.max", 5),
    ({"scale": {"max": 1}}, "scale.max", 1),
    ({"scale": {"max": 1000}}, "scale.max", 1000),
    ({"scale": {"min": 1000, "max": 1000}}, "scale.min", 1000),
    ({"scale": {"target": 0.5}}, "scale.target", 0.5),
    ({"scale": {"target": 7}}, "scale.target", 7.0),
    ({"scale": {"concurrency": 0}}, "scale.concurrency", 0),
    ({"scale": {"concurrency": 4}}, "scale.concurrency", 4),
    ({"scale": {"idle": 0}}, "scale.idle", 0.0),
    ({"scale": {"idle": "5m"}}, "scale.idle", 300.0),
    ({"scale": {"window": "6s"}}, "scale.window", 6.0),
    ({"scale": {"window": "1h"}}, "scale.window", 3600.0),
    ({"scale": {"window": 90}}, "scale.window", 90.0),
    ({"resources": None}, "resources", Resources()),
    ({"resources": {"cpu": "500m"}}, "resources.cpu", 0.5),
    ({"resources": {"cpu": "1500m"}}, "resources.cpu", 1.5),
    ({"resources": {"cpu": 2}}, "resources.cpu", 2.0),
    ({"resources": {"cpu": "0.25"}}, "resources.cpu", 0.25),
    ({"resources": {"memory": "16Mi"}}, "resources.memory", 16 * MiB),
    ({"resources": {"memory": "1Gi"}}, "resources.memory", GiB),
    ({"resources": {"memory": GiB}}, "resources.memory", GiB),
    ({"rollout": None}, "rollout", RolloutPolicy()),
    ({"rollout": {"steps": [100]}}, "rollout.steps", [100]),
    ({"rollout": {"steps": [1, 2, 100]}}, "rollout.steps", [1, 2, 100]),
    ({"rollout": {"steps": [50.0, 100]}}, "rollout.steps", [50, 100]),
    ({"rollout": {"interval": "1m"}}, "rollout.interval", 60.0),
    ({"rollout": {"interval": "100ms"}}, "rollout.interval", 0.1),
    ({"rollout": {"max_error_ratio": 0}}, "rollout.max_error_ratio", 0.0),
    ({"rollout": {"max_error_ratio": 1}}, "rollout.max_error_ratio", 1.0),
    ({"rollout": {"max_p95_ratio": 1}}, "rollout.max_p95_ratio", 1.0),
    ({"rollout": {"max_p95_ratio": 10.5}}, "rollout.max_p95_ratio", 10.5),
    ({"rollout": {"min_requests": 0}}, "rollout.min_requests", 0),
    ({"rollout": {"min_requests": 1000}}, "rollout.min_requests", 1000),
]


def _attr(spec: Spec, dotted: str) -> Any:
    value: Any = spec
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize(("overrides", "attr", "expected"), GOOD)
def test_good_values(overrides: dict[str, Any], attr: str, expected: Any) -> None:
    value = _attr(parse_spec(spec_with(**overrides)), attr)
    assert value == expected
    assert type(value) is type(expected)


# (overrides of the minimal document, the path the error must name)
BAD = [
    # name
    ({"name": None}, "name"),
    ({"name": "Hello"}, "name"),
    ({"name": "hello_world"}, "name"),
    ({"name": "-x"}, "name"),
    ({"name": "x-"}, "name"),
    ({"name": "9lives"}, "name"),
    ({"name": "x" * 64}, "name"),
    ({"name": 5}, "name"),
    # handler and image
    ({"handler": "handler"}, "handler"),
    ({"handler": "a:b:c"}, "handler"),
    ({"handler": "1mod:f"}, "handler"),
    ({"handler": "mod:"}, "handler"),
    ({"handler": ":f"}, "handler"),
    ({"handler": "mod:f.g"}, "handler"),
    ({"handler": "mod..x:f"}, "handler"),
    ({"handler": "import:handle"}, "handler"),
    ({"handler": "mod:f "}, "handler"),
    ({"handler": 5}, "handler"),
    ({"handler": "handler:handle", "image": "myorg/app:1"}, "image"),
    ({"image": "MyOrg/App"}, "image"),
    ({"image": "has space"}, "image"),
    ({"image": ""}, "image"),
    ({"image": "app:"}, "image"),
    ({"image": "a" * 300}, "image"),
    ({"image": ["app"]}, "image"),
    # env
    ({"env": ["A=1"]}, "env"),
    ({"env": "A=1"}, "env"),
    ({"env": {True: "x"}}, "env"),
    ({"env": {1: "x"}}, "env"),
    ({"env": {"1A": "x"}}, "env.1A"),
    ({"env": {"MY-VAR": "x"}}, "env.MY-VAR"),
    ({"env": {"": "x"}}, "env.''"),
    ({"env": {"A B": "x"}}, "env.'A B'"),
    ({"env": {"GREETING": None}}, "env.GREETING"),
    ({"env": {"GREETING": ["a"]}}, "env.GREETING"),
    ({"env": {"GREETING": {"a": 1}}}, "env.GREETING"),
    ({"env": {"GREETING": "a\x00b"}}, "env.GREETING"),
    ({"env": {"STAMP": dt.datetime(2024, 1, 2, 3, 4)}}, "env.STAMP"),
    ({"env": {"PORT": "9000"}}, "env.PORT"),
    # port
    ({"port": 0}, "port"),
    ({"port": 65536}, "port"),
    ({"port": -1}, "port"),
    ({"port": "8080"}, "port"),
    ({"port": True}, "port"),
    ({"port": 80.5}, "port"),
    # timeout
    ({"timeout": 0}, "timeout"),
    ({"timeout": "0s"}, "timeout"),
    ({"timeout": 600.5}, "timeout"),
    ({"timeout": "11m"}, "timeout"),
    ({"timeout": -1}, "timeout"),
    ({"timeout": "soon"}, "timeout"),
    ({"timeout": True}, "timeout"),
    # scale
    ({"scale": [1]}, "scale"),
    ({"scale": "fast"}, "scale"),
    ({"scale": {"min": -1}}, "scale.min"),
    ({"scale": {"min": 1.5}}, "scale.min"),
    ({"scale": {"min": True}}, "scale.min"),
    ({"scale": {"min": "1"}}, "scale.min"),
    ({"scale": {"min": 21}}, "scale.min"),  # above the default max
    ({"scale": {"min": 1001, "max": 1000}}, "scale.min"),
    ({"scale": {"max": 0}}, "scale.max"),
    ({"scale": {"max": -3}}, "scale.max"),
    ({"scale": {"max": 1001}}, "scale.max"),
    ({"scale": {"max": True}}, "scale.max"),
    ({"scale": {"max": 2.5}}, "scale.max"),
    ({"scale": {"min": 5, "max": 4}}, "scale.max"),
    ({"scale": {"target": 0}}, "scale.target"),
    ({"scale": {"target": -1}}, "scale.target"),
    ({"scale": {"target": True}}, "scale.target"),
    ({"scale": {"target": "10"}}, "scale.target"),
    ({"scale": {"target": math.nan}}, "scale.target"),
    ({"scale": {"target": math.inf}}, "scale.target"),
    ({"scale": {"concurrency": -1}}, "scale.concurrency"),
    ({"scale": {"concurrency": 1.5}}, "scale.concurrency"),
    ({"scale": {"concurrency": True}}, "scale.concurrency"),
    ({"scale": {"idle": -1}}, "scale.idle"),
    ({"scale": {"idle": "later"}}, "scale.idle"),
    ({"scale": {"window": "5s"}}, "scale.window"),
    ({"scale": {"window": 5.99}}, "scale.window"),
    ({"scale": {"window": "3601s"}}, "scale.window"),
    ({"scale": {"window": "2h"}}, "scale.window"),
    ({"scale": {"window": 0}}, "scale.window"),
    # resources
    ({"resources": "big"}, "resources"),
    ({"resources": {"cpu": 0}}, "resources.cpu"),
    ({"resources": {"cpu": -1}}, "resources.cpu"),
    ({"resources": {"cpu": "0m"}}, "resources.cpu"),
    ({"resources": {"cpu": "500 m"}}, "resources.cpu"),
    ({"resources": {"cpu": "0.5m"}}, "resources.cpu"),
    ({"resources": {"cpu": "lots"}}, "resources.cpu"),
    ({"resources": {"cpu": True}}, "resources.cpu"),
    ({"resources": {"cpu": math.inf}}, "resources.cpu"),
    ({"resources": {"memory": "15Mi"}}, "resources.memory"),
    ({"resources": {"memory": 16 * MiB - 1}}, "resources.memory"),
    ({"resources": {"memory": "lots"}}, "resources.memory"),
    ({"resources": {"memory": "256MB"}}, "resources.memory"),
    ({"resources": {"memory": True}}, "resources.memory"),
    ({"resources": {"memory": -1}}, "resources.memory"),
    # rollout
    ({"rollout": [10, 100]}, "rollout"),
    ({"rollout": {"steps": []}}, "rollout.steps"),
    ({"rollout": {"steps": "10,100"}}, "rollout.steps"),
    ({"rollout": {"steps": 100}}, "rollout.steps"),
    ({"rollout": {"steps": [10, 50]}}, "rollout.steps"),
    ({"rollout": {"steps": [0, 100]}}, "rollout.steps[0]"),
    ({"rollout": {"steps": [10, 101]}}, "rollout.steps[1]"),
    ({"rollout": {"steps": [50, 10, 100]}}, "rollout.steps[1]"),
    ({"rollout": {"steps": [10, 10, 100]}}, "rollout.steps[1]"),
    ({"rollout": {"steps": [10.5, 100]}}, "rollout.steps[0]"),
    ({"rollout": {"steps": [True, 100]}}, "rollout.steps[0]"),
    ({"rollout": {"steps": [10, "50", 100]}}, "rollout.steps[1]"),
    ({"rollout": {"interval": 0}}, "rollout.interval"),
    ({"rollout": {"interval": -1}}, "rollout.interval"),
    ({"rollout": {"interval": "often"}}, "rollout.interval"),
    ({"rollout": {"max_error_ratio": -0.1}}, "rollout.max_error_ratio"),
    ({"rollout": {"max_error_ratio": 1.1}}, "rollout.max_error_ratio"),
    ({"rollout": {"max_error_ratio": True}}, "rollout.max_error_ratio"),
    ({"rollout": {"max_error_ratio": "0.1"}}, "rollout.max_error_ratio"),
    ({"rollout": {"max_p95_ratio": 0.99}}, "rollout.max_p95_ratio"),
    ({"rollout": {"max_p95_ratio": 0}}, "rollout.max_p95_ratio"),
    ({"rollout": {"max_p95_ratio": True}}, "rollout.max_p95_ratio"),
    ({"rollout": {"min_requests": -1}}, "rollout.min_requests"),
    ({"rollout": {"min_requests": 1.5}}, "rollout.min_requests"),
    ({"rollout": {"min_requests": True}}, "rollout.min_requests"),
]


@pytest.mark.parametrize(("overrides", "path"), BAD)
def test_bad_values_name_the_field(overrides: dict[str, Any], path: str) -> None:
    data: dict[str, Any] = {"name": "hello"}
    data.update(overrides)
    err = refused(data)
    assert err.path == path
    assert str(err).startswith(f"{path}: ")
    assert err.expected and err.expected in str(err)


def test_name_is_required() -> None:
    err = refused({"handler": "handler:handle"})
    assert err.path == "name"
    assert str(err).startswith("name: required; expected a DNS label")


def test_max_below_min_message_names_min() -> None:
    err = refused(spec_with(scale={"min": 5, "max": 4}))
    assert str(err) == "scale.max: expected an integer >= scale.min (5), got 4"


def test_min_above_default_max_is_blamed_on_min() -> None:
    err = refused(spec_with(scale={"min": 21}))
    assert "scale.max (20" in str(err)


def test_handler_and_image_are_mutually_exclusive() -> None:
    err = refused(spec_with(handler="handler:handle", image="myorg/app:1"))
    assert "mutually exclusive" in str(err)


def test_env_reserved_port_and_boolean_key_messages() -> None:
    assert "port" in refused(spec_with(env={"PORT": "1"})).expected
    err = refused(spec_with(env={True: "x"}))  # `ON: x` in YAML 1.1
    assert "key true is not a string" in str(err)


def test_env_keeps_order() -> None:
    env = {"Z": "1", "A": "2", "M": "3"}
    assert list(parse_spec(spec_with(env=env)).env) == ["Z", "A", "M"]


# --- unknown keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "path", "listing"),
    [
        (
            {"nmae": "x"},
            "nmae",
            "name, handler, image, env, port, timeout, max_body, scale, resources, rollout",
        ),
        ({"memory": "1Gi"}, "memory", "name, handler, image"),
        ({"scale": {"mx": 3}}, "scale.mx", "min, max, target, concurrency, idle, window"),
        ({"scale": {"minScale": 1}}, "scale.minScale", "min, max, target"),
        ({"resources": {"mem": "1Gi"}}, "resources.mem", "cpu, memory"),
        ({"resources": {"gpu": 1}}, "resources.gpu", "cpu, memory"),
        ({"rollout": {"step": [100]}}, "rollout.step", "steps, interval, max_error_ratio"),
        (
            {"rollout": {"max_error": 0.1}},
            "rollout.max_error",
            "steps, interval, max_error_ratio, max_p95_ratio, min_requests",
        ),
        ({"scale.max": 3}, "'scale.max'", "name, handler"),
        ({5: "x"}, "5", "name, handler"),
    ],
)
def test_unknown_keys_are_refused_by_path(
    overrides: dict[Any, Any], path: str, listing: str
) -> None:
    data: dict[Any, Any] = {"name": "hello"}
    data.update(overrides)
    err = refused(data)
    assert err.path == path
    assert str(err).startswith(f"{path}: unknown key; expected one of {listing}")


def test_unknown_key_suggests_the_closest() -> None:
    assert "did you mean max?" in str(refused(spec_with(scale={"mx": 3})))


def test_null_values_take_defaults() -> None:
    data = spec_with(
        handler=None,
        image=None,
        port=None,
        timeout=None,
        scale={"min": None, "idle": None},
        resources={"cpu": None},
        rollout={"steps": None},
    )
    assert parse_spec(data) == Spec(name="hello")


def test_errors_carry_the_source() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with(port=0), source="fn/torpor.yaml")
    assert info.value.source == "fn/torpor.yaml"
    assert str(info.value).startswith("port: ")


# --- round trip -----------------------------------------------------------------------------

ROUND_TRIP_SPECS = [
    Spec(name="hello"),
    Spec(name="img", handler=None, image="myorg/app:1.2", port=9000),
    Spec(
        name="full-1",
        handler="app.main:handle",
        env={"GREETING": "hi", "EMPTY": "", "DEBUG": "true", "N": "5"},
        timeout=0.25,
        scale=Scale(min=2, max=7, target=2.5, concurrency=3, idle=90.0, window=6.0),
        resources=Resources(cpu=1.5, memory=3 * GiB),
        rollout=RolloutPolicy(
            steps=[1, 33, 100],
            interval=0.5,
            max_error_ratio=0.0,
            max_p95_ratio=1.0,
            min_requests=0,
        ),
    ),
    Spec(
        name="odd",
        timeout=1 / 3,
        scale=Scale(idle=0.0, window=3600.0, target=0.1),
        resources=Resources(cpu=0.001, memory=16 * MiB + 1),
        rollout=RolloutPolicy(interval=123.000001),
    ),
]


@pytest.mark.parametrize("spec", ROUND_TRIP_SPECS, ids=lambda s: s.name)
def test_round_trip(spec: Spec) -> None:
    doc = spec_to_yaml_dict(spec)
    assert parse_spec(doc) == spec
    # and through real YAML text
    text = yaml.safe_dump(doc, sort_keys=False)
    assert parse_spec(yaml.safe_load(text)) == spec


def test_yaml_dict_uses_readable_units() -> None:
    doc = spec_to_yaml_dict(Spec(name="hello"))
    assert doc["timeout"] == "30s"
    assert doc["scale"]["idle"] == "30s"
    assert doc["scale"]["window"] == "1m"
    assert doc["resources"]["memory"] == "256Mi"
    assert doc["handler"] == "handler:handle" and "image" not in doc
    img = spec_to_yaml_dict(Spec(name="img", image="app:1"))  # handler left at its default
    assert "handler" not in img and parse_spec(img).handler is None


def test_model_to_dict_is_accepted_too() -> None:
    spec = ROUND_TRIP_SPECS[2]
    assert parse_spec(spec.to_dict()) == spec
    img = ROUND_TRIP_SPECS[1]
    assert parse_spec(img.to_dict()) == img


# --- load_spec ------------------------------------------------------------------------------


def write(folder: Path, text: str, name: str = "torpor.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("filename", ["torpor.yaml", "torpor.yml"])
def test_load_spec_reads_the_folder(tmp_path: Path, filename: str) -> None:
    write(tmp_path, "name: hello\ntimeout: 5s\nresources: {memory: 1Gi}\n", filename)
    assert load_spec(tmp_path) == Spec(name="hello", timeout=5.0, resources=Resources(memory=GiB))
    assert load_spec(str(tmp_path)).name == "hello"


def test_load_spec_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert str(tmp_path / "torpor.yaml") in str(info.value)
    assert "not found" in str(info.value)


def test_load_spec_source_replaces_the_path_in_messages(tmp_path: Path) -> None:
    write(tmp_path, "name: hello\nport: [\n")
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path, source="torpor.yaml")
    assert str(info.value).startswith("torpor.yaml: invalid YAML at line ")
    assert str(tmp_path) not in str(info.value)
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "empty", source="upload")
    assert str(tmp_path) not in str(info.value)


def test_load_spec_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope")
    assert "not a folder" in str(info.value)


def test_load_spec_refuses_two_spec_files(tmp_path: Path) -> None:
    write(tmp_path, "name: a\n")
    write(tmp_path, "name: b\n", "torpor.yml")
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert "torpor.yml" in str(info.value)


def test_load_spec_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: hello\nscale:\n  min: 1\n  max: [2\n")
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    err = info.value
    assert err.path == "" and err.source == str(path)
    assert err.line is not None and err.line >= 4
    assert str(err).startswith(f"{path}: invalid YAML at line {err.line}, column ")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"name: hello\nx: \xff\xfe\n", "invalid YAML"),
        (b"name: hello\nport: " + b"1" * 5000 + b"\n", "invalid YAML"),
        (b"name: [" + b"[" * 3000 + b"]" * 3000 + b"]\n", "invalid YAML"),
        (b"", "the document is empty"),
        (b"# only a comment\n", "the document is empty"),
        (b"- name: hello\n", "expected a mapping"),
        (b"name: a\n---\nname: b\n", "invalid YAML"),
        (b"name: hello\n" + b"#" * (1024 * 1024) + b"\n", "too large"),
    ],
    ids=["not-utf8", "huge-int", "deep", "empty", "comment", "list", "two-docs", "too-large"],
)
def test_load_spec_bad_files(tmp_path: Path, content: bytes, fragment: str) -> None:
    (tmp_path / "torpor.yaml").write_bytes(content)
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert info.value.path == ""
    assert str(info.value).startswith(str(tmp_path / "torpor.yaml") + ": ")
    assert fragment in str(info.value)
    assert len(str(info.value)) < 400


def test_load_spec_field_errors_keep_their_path(tmp_path: Path) -> None:
    write(tmp_path, "name: hello\nscale:\n  mx: 3\n")
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert info.value.path == "scale.mx"
    assert info.value.source == str(tmp_path / "torpor.yaml")


def test_load_spec_yaml_quirks(tmp_path: Path) -> None:
    # YAML 1.1 reads yes as a boolean and 1:30 as sexagesimal 90.
    write(tmp_path, "name: hello\nenv: {DEBUG: yes, V: '1.10'}\ntimeout: 1:30\n")
    spec = load_spec(tmp_path)
    assert spec.env == {"DEBUG": "true", "V": "1.10"}
    assert spec.timeout == 90.0


def test_torpor_prefixed_env_is_reserved() -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "f", "env": {"TORPOR_HOST": "0.0.0.0"}})
    assert err.value.path == "env.TORPOR_HOST"

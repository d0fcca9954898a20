"""Every number is finite and bounded: the spec's bounds table, PATCH /scale, rollout
policies, strict JSON bodies, safe JSON views; and tag hosts that clash with another
function (the API's check and the gateway's deterministic resolution)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from torpor.api import hosts
from torpor.api.app import ApiError, parse_scale_patch
from torpor.api.jsonsafe import MAX_INT_DIGITS, BadJson, SafeJSONResponse, finite, loads, non_finite
from torpor.api.rollouts import parse_policy
from torpor.gateway.routes import RouteTable
from torpor.gateway.upstream import Pools
from torpor.model import (
    Function,
    Revision,
    RolloutPolicy,
    Scale,
    ScaleOverride,
    Spec,
    TrafficTarget,
)
from torpor.spec import (
    MAX_CPU,
    MAX_IDLE,
    MAX_MIN_REQUESTS,
    MAX_P95_RATIO,
    MAX_TARGET,
    SpecError,
    load_spec,
    parse_spec,
)

GiB = 1024**3
HUGE = 10**400  # a float() of it overflows


def spec_error(data: dict[str, Any], **kw: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec({"name": "hello", **data}, **kw)
    return info.value


# --- torpor.yaml: the bounds table ------------------------------------------------------------

GOOD_EDGES: list[tuple[dict[str, Any], Any]] = [
    ({"scale": {"target": MAX_TARGET}}, lambda s: s.scale.target == 10_000.0),
    ({"scale": {"target": 0.01}}, lambda s: s.scale.target == 0.01),
    ({"scale": {"concurrency": 10_000}}, lambda s: s.scale.concurrency == 10_000),
    ({"scale": {"idle": "24h"}}, lambda s: s.scale.idle == MAX_IDLE),
    ({"scale": {"min": 1000, "max": 1000}}, lambda s: s.scale.max == 1000),
    ({"resources": {"cpu": MAX_CPU}}, lambda s: s.resources.cpu == 64.0),
    ({"resources": {"cpu": "1m"}}, lambda s: s.resources.cpu == 0.001),
    ({"resources": {"cpu": 0.001}}, lambda s: s.resources.cpu == 0.001),
    ({"resources": {"cpu": 0.125}}, lambda s: s.resources.cpu == 0.125),
    ({"resources": {"memory": "64Gi"}}, lambda s: s.resources.memory == 64 * GiB),
    ({"rollout": {"interval": "24h"}}, lambda s: s.rollout.interval == 86_400.0),
    ({"rollout": {"max_p95_ratio": MAX_P95_RATIO}}, lambda s: s.rollout.max_p95_ratio == 1000.0),
    ({"rollout": {"min_requests": MAX_MIN_REQUESTS}}, lambda s: s.rollout.min_requests == 10**6),
    ({"timeout": 1e-3}, lambda s: s.timeout == 0.001),
    ({"stream_idle": "1h"}, lambda s: s.stream_idle == 3600.0),
    ({"stream_idle": "250ms"}, lambda s: s.stream_idle == 0.25),
    ({"max_connection": "24h"}, lambda s: s.max_connection == 86_400.0),
    ({"websocket": "chat:serve"}, lambda s: s.websocket == "chat:serve"),
    ({}, lambda s: (s.stream_idle, s.max_connection, s.websocket) == (60.0, 3600.0, None)),
]


@pytest.mark.parametrize(("data", "check"), GOOD_EDGES)
def test_values_at_the_bounds_are_accepted(data: dict[str, Any], check: Any) -> None:
    assert check(parse_spec({"name": "hello", **data}))


BAD_NUMBERS: list[tuple[dict[str, Any], str]] = [
    ({"scale": {"target": 1e300}}, "scale.target"),
    ({"scale": {"target": 10_000.5}}, "scale.target"),
    ({"scale": {"target": HUGE}}, "scale.target"),
    ({"scale": {"target": -math.inf}}, "scale.target"),
    ({"scale": {"concurrency": 10_001}}, "scale.concurrency"),
    ({"scale": {"concurrency": HUGE}}, "scale.concurrency"),
    ({"scale": {"concurrency": 1e300}}, "scale.concurrency"),
    ({"scale": {"min": HUGE}}, "scale.min"),
    ({"scale": {"max": HUGE}}, "scale.max"),
    ({"scale": {"max": 1e300}}, "scale.max"),
    ({"scale": {"max": math.nan}}, "scale.max"),
    ({"scale": {"idle": "25h"}}, "scale.idle"),
    ({"scale": {"idle": 1e300}}, "scale.idle"),
    ({"scale": {"idle": math.inf}}, "scale.idle"),
    ({"scale": {"idle": math.nan}}, "scale.idle"),
    ({"scale": {"window": math.nan}}, "scale.window"),
    ({"scale": {"window": HUGE}}, "scale.window"),
    ({"timeout": math.nan}, "timeout"),
    ({"stream_idle": 0}, "stream_idle"),
    ({"stream_idle": "61m"}, "stream_idle"),
    ({"stream_idle": math.inf}, "stream_idle"),
    ({"stream_idle": HUGE}, "stream_idle"),
    ({"max_connection": "25h"}, "max_connection"),
    ({"max_connection": -1}, "max_connection"),
    ({"max_connection": math.nan}, "max_connection"),
    ({"timeout": HUGE}, "timeout"),
    ({"timeout": "99999999999999999999h"}, "timeout"),
    ({"port": HUGE}, "port"),
    ({"port": 1e300}, "port"),
    ({"resources": {"cpu": 1e300}}, "resources.cpu"),
    ({"resources": {"cpu": 64.001}}, "resources.cpu"),
    ({"resources": {"cpu": HUGE}}, "resources.cpu"),
    ({"resources": {"cpu": math.nan}}, "resources.cpu"),
    ({"resources": {"cpu": 0.0005}}, "resources.cpu"),  # finer than a millicore
    ({"resources": {"cpu": "0.0005"}}, "resources.cpu"),
    ({"resources": {"cpu": 1e-300}}, "resources.cpu"),
    ({"resources": {"cpu": "999999999"}}, "resources.cpu"),
    ({"resources": {"cpu": "65000m"}}, "resources.cpu"),
    ({"resources": {"memory": "65Gi"}}, "resources.memory"),
    ({"resources": {"memory": "1Ti"}}, "resources.memory"),
    ({"resources": {"memory": HUGE}}, "resources.memory"),
    ({"resources": {"memory": 1e300}}, "resources.memory"),
    ({"rollout": {"interval": "25h"}}, "rollout.interval"),
    ({"rollout": {"interval": math.inf}}, "rollout.interval"),
    ({"rollout": {"max_p95_ratio": 1000.5}}, "rollout.max_p95_ratio"),
    ({"rollout": {"max_p95_ratio": math.inf}}, "rollout.max_p95_ratio"),
    ({"rollout": {"max_p95_ratio": math.nan}}, "rollout.max_p95_ratio"),
    ({"rollout": {"max_error_ratio": math.nan}}, "rollout.max_error_ratio"),
    ({"rollout": {"min_requests": MAX_MIN_REQUESTS + 1}}, "rollout.min_requests"),
    ({"rollout": {"min_requests": HUGE}}, "rollout.min_requests"),
    ({"rollout": {"steps": [HUGE, 100]}}, "rollout.steps[0]"),
    ({"rollout": {"steps": [math.nan, 100]}}, "rollout.steps[0]"),
]


@pytest.mark.parametrize(("data", "path"), BAD_NUMBERS)
def test_out_of_range_and_non_finite_numbers_name_the_field(
    data: dict[str, Any], path: str
) -> None:
    err = spec_error(data)
    assert err.path == path
    assert str(err).startswith(f"{path}: ")
    assert "9" * 60 not in str(err)  # a huge value is described, not echoed


@pytest.mark.parametrize(
    ("yaml_value", "path"),
    [
        ("{target: .nan}", "scale.target"),
        ("{target: .inf}", "scale.target"),
        ("{target: -.inf}", "scale.target"),
        ("{target: 1e300}", "scale.target"),
        ("{target: true}", "scale.target"),
        ("{max: true}", "scale.max"),
        ("{idle: .inf}", "scale.idle"),
        ("{concurrency: " + "9" * 400 + "}", "scale.concurrency"),
        ("{max: " + "9" * 400 + "}", "scale.max"),
    ],
)
def test_yaml_specials_are_refused_by_path(tmp_path: Path, yaml_value: str, path: str) -> None:
    (tmp_path / "torpor.yaml").write_text(f"name: hello\nscale: {yaml_value}\n")
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert info.value.path == path


def test_yaml_cpu_1e300_is_refused(tmp_path: Path) -> None:
    (tmp_path / "torpor.yaml").write_text("name: hello\nresources: {cpu: 1e300}\n")
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert info.value.path == "resources.cpu"
    assert "64" in str(info.value)


# --- the platform's cap (torpor up --max-replicas) at deploy ----------------------------------


def test_scale_max_above_the_cap_is_refused_naming_the_cap() -> None:
    err = spec_error({"scale": {"max": 11}}, max_replicas=10)
    assert err.path == "scale.max"
    assert "cap of 10" in str(err) and "--max-replicas" in str(err)
    assert parse_spec({"name": "hello", "scale": {"max": 10}}, max_replicas=10).scale.max == 10


def test_scale_min_above_the_cap_is_refused_naming_the_cap() -> None:
    err = spec_error({"scale": {"min": 11, "max": 11}}, max_replicas=10)
    assert err.path == "scale.min" and "cap of 10" in str(err)
    err = spec_error(
        {"scale": {"min": 15}}, max_replicas=10
    )  # max omitted: the default, within the cap
    assert err.path == "scale.min" and "cap of 10" in str(err)


def test_an_omitted_max_is_the_default_within_the_cap() -> None:
    assert parse_spec({"name": "hello"}, max_replicas=10).scale.max == 10
    assert parse_spec({"name": "hello"}, max_replicas=100).scale.max == Scale().max
    assert parse_spec({"name": "hello"}).scale.max == Scale().max
    # a cap above the spec's own bound changes nothing
    assert spec_error({"scale": {"max": 1001}}, max_replicas=5000).path == "scale.max"


# --- PATCH /scale ------------------------------------------------------------------------------


def _fn(
    name: str = "f",
    scale: ScaleOverride | None = None,
    traffic: list[TrafficTarget] | None = None,
    revisions: int = 1,
    status: str = "ready",
    tag: str | None = None,
) -> Function:
    revs = [
        Revision(
            name=f"{name}-{i:05d}",
            function=name,
            number=i,
            spec=Spec(name=name),
            status=status,  # type: ignore[arg-type]
            tag=tag,
        )
        for i in range(1, revisions + 1)
    ]
    return Function(
        name=name, revisions=revs, traffic=traffic or [], scale=scale or ScaleOverride()
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"target": math.nan}, "target"),
        ({"target": math.inf}, "target"),
        ({"target": -math.inf}, "target"),
        ({"target": 1e300}, "target"),
        ({"target": HUGE}, "target"),
        ({"target": MAX_TARGET + 1}, "target"),
        ({"target": 0}, "target"),
        ({"target": True}, "target"),
        ({"target": "5"}, "target"),
        ({"max": math.inf}, "max"),
        ({"max": 1e999}, "max"),  # 1e999 is infinity in Python
        ({"max": 10**6}, "max"),
        ({"max": 11}, "max"),  # the cap below is 10
        ({"max": HUGE}, "max"),
        ({"min": 11}, "min"),
        ({"replicas": 11}, "replicas"),
        ({"replicas": 2.0}, "replicas"),
        ({"concurrency": 10_001}, "concurrency"),
        ({"concurrency": HUGE}, "concurrency"),
        ({"concurrency": math.nan}, "concurrency"),
        ({"min": True}, "min"),
    ],
)
def test_scale_patch_refuses_out_of_range_naming_the_field(
    body: dict[str, Any], field: str
) -> None:
    with pytest.raises(ApiError) as info:
        parse_scale_patch(_fn(), body, cap=10)
    assert info.value.status == 400
    assert info.value.extra["field"] == field
    assert info.value.detail.startswith(f"{field}: ")
    assert "9" * 60 not in info.value.detail


def test_scale_patch_above_the_cap_names_the_cap() -> None:
    with pytest.raises(ApiError) as info:
        parse_scale_patch(_fn(), {"max": 11}, cap=10)
    assert "cap of 10" in info.value.detail


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"target": MAX_TARGET}, ScaleOverride(target=10_000.0)),
        ({"target": 7}, ScaleOverride(target=7.0)),
        ({"concurrency": 10_000}, ScaleOverride(concurrency=10_000)),
        ({"max": 10}, ScaleOverride(max=10)),
        ({"replicas": 0}, ScaleOverride(min=0, max=0)),
    ],
)
def test_scale_patch_accepts_the_bounds(body: dict[str, Any], expected: ScaleOverride) -> None:
    assert parse_scale_patch(_fn(), body, cap=10) == expected


def test_scale_patch_drops_a_stored_nan_target() -> None:
    poisoned = _fn(scale=ScaleOverride(max=5, target=math.nan))
    assert parse_scale_patch(poisoned, {"max": 4}, cap=10) == ScaleOverride(max=4)


# --- rollout policy (POST /rollout) --------------------------------------------------------


def _policy_error(body: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_policy(RolloutPolicy(), body, ApiError)
    return info.value


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_p95_ratio": math.inf}, "max_p95_ratio"),
        ({"max_p95_ratio": MAX_P95_RATIO + 1}, "max_p95_ratio"),
        ({"max_p95_ratio": HUGE}, "max_p95_ratio"),
        ({"max_error_ratio": math.nan}, "max_error_ratio"),
        ({"min_requests": MAX_MIN_REQUESTS + 1}, "min_requests"),
        ({"min_requests": HUGE}, "min_requests"),
        ({"interval": "25h"}, "interval"),
        ({"interval": math.inf}, "interval"),
        ({"interval": HUGE}, "interval"),
    ],
)
def test_rollout_policy_bounds(body: dict[str, Any], field: str) -> None:
    err = _policy_error(body)
    assert err.status == 400 and err.extra["field"] == field


def test_rollout_policy_accepts_the_bounds() -> None:
    out = parse_policy(
        RolloutPolicy(),
        {"max_p95_ratio": 1000, "min_requests": 10**6, "interval": "24h", "max_error_ratio": 1},
        ApiError,
    )
    assert (out.max_p95_ratio, out.min_requests, out.interval, out.max_error_ratio) == (
        1000.0,
        10**6,
        86400.0,
        1.0,
    )


# --- JSON in and out --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field", "shown"),
    [
        ('{"target": NaN}', "target", "NaN"),
        ('{"target": Infinity}', "target", "Infinity"),
        ('{"target": -Infinity}', "target", "-Infinity"),
        ('{"max": 1e999}', "max", "1e999"),
        ('{"max": -1e999}', "max", "-1e999"),
        ('{"traffic": [{"revision": "a", "percent": NaN}]}', "traffic[0].percent", "NaN"),
        ('{"a": {"b": [1, 2, Infinity]}}', "a.b[2]", "Infinity"),
        (
            '{"n": ' + "9" * (MAX_INT_DIGITS + 1) + "}",
            "n",
            f"an integer of {MAX_INT_DIGITS + 1} digits",
        ),
        ('{"n": -' + "9" * 5000 + "}", "n", "an integer of 5000 digits"),
    ],
)
def test_json_non_standard_and_out_of_range_numbers_are_refused_by_path(
    raw: str, field: str, shown: str
) -> None:
    with pytest.raises(BadJson) as info:
        loads(raw)
    assert info.value.field == field
    assert str(info.value) == f"{field}: expected a finite number in range, got {shown}"


def test_json_top_level_nan_and_broken_documents() -> None:
    with pytest.raises(BadJson) as info:
        loads("NaN")
    assert info.value.field is None and str(info.value).startswith("body: ")
    for raw in (b"{", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b""):
        with pytest.raises(BadJson) as info:
            loads(raw)
        assert str(info.value).startswith("body is not valid JSON")


def test_json_valid_documents_parse_as_json_does() -> None:
    raw = (
        '{"a": 1, "b": 2.5, "c": [true, null, "x", -0.0, 1e300], "d": ' + "9" * MAX_INT_DIGITS + "}"
    )
    assert loads(raw) == json.loads(raw)
    assert loads(b'{"max": 5}') == {"max": 5}


def test_views_render_a_stored_nan_as_null_and_say_where() -> None:
    doc = {"scale": {"target": math.nan, "max": 3}, "revisions": [{"spec": {"timeout": math.inf}}]}
    assert non_finite(doc) == ["revisions[0].spec.timeout: inf", "scale.target: nan"]
    assert finite(doc) == {
        "scale": {"target": None, "max": 3},
        "revisions": [{"spec": {"timeout": None}}],
    }
    body = SafeJSONResponse(doc).body
    assert json.loads(body) == finite(doc)
    assert SafeJSONResponse({"ok": 1.5}).body == b'{"ok":1.5}'


# --- tag hosts that clash with another function ------------------------------------------------


def test_a_new_function_named_like_another_functions_tag_host_is_refused() -> None:
    hello = _fn("hello", traffic=[TrafficTarget("hello-00001", 100, "canary")])
    clash = hosts.deploy_clash([hello], "canary-hello", None, "torpor.localhost")
    assert clash is not None and clash.field == "name"
    assert (
        "canary-hello.torpor.localhost" in clash.message
        and "tag 'canary' of function hello" in clash.message
    )
    assert hosts.deploy_clash([hello], "other", None, "d") is None
    # a function that exists already (a clash from before the check) may still be redeployed
    old = _fn("canary-hello")
    assert hosts.deploy_clash([hello, old], "canary-hello", None, "d") is None


def test_a_tag_still_waiting_for_its_revision_counts() -> None:
    hello = _fn("hello", traffic=[TrafficTarget("hello-00001", 100)], revisions=1)
    hello.revisions.append(
        Revision(
            name="hello-00002",
            function="hello",
            number=2,
            spec=Spec(name="hello"),
            status="building",
            tag="canary",
        )
    )
    clash = hosts.deploy_clash([hello], "canary-hello", None, "d")
    assert clash is not None and "once ready" in clash.message


def test_a_tag_whose_host_is_another_function_is_refused_at_deploy_and_traffic() -> None:
    hello = _fn("hello", traffic=[TrafficTarget("hello-00001", 100)], revisions=2)
    other = _fn("canary-hello")
    clash = hosts.deploy_clash([hello, other], "hello", "canary", "d")
    assert clash is not None and clash.field == "tag" and "function canary-hello" in clash.message
    targets = [TrafficTarget("hello-00001", 90), TrafficTarget("hello-00002", 10, "canary")]
    clash = hosts.traffic_clash([hello, other], hello, targets, "d")
    assert clash is not None and clash.field == "traffic[1].tag"
    # another function's tag host clashes too: tag a on b-c and tag a-b on c are both a-b-c.hosts
    bc = _fn("b-c", traffic=[TrafficTarget("b-c-00001", 100, "a")])
    c = _fn("c", traffic=[TrafficTarget("c-00001", 100)])
    clash = hosts.traffic_clash([bc, c], c, [TrafficTarget("c-00001", 100, "a-b")], "d")
    assert clash is not None and "tag 'a' of function b-c" in clash.message
    assert (
        hosts.traffic_clash([hello, other], hello, [TrafficTarget("hello-00001", 100, "beta")], "d")
        is None
    )


def test_a_function_keeps_a_tag_it_already_has() -> None:
    hello = _fn("hello", traffic=[TrafficTarget("hello-00001", 100, "canary")], revisions=2)
    other = _fn("canary-hello")  # a clash from before the check
    moved = [TrafficTarget("hello-00002", 100, "canary")]
    assert hosts.traffic_clash([hello, other], hello, moved, "d") is None
    assert hosts.deploy_clash([hello, other], "hello", "canary", "d") is None


# --- the gateway: a clash from before resolves the same way in any order ----------------------


def _routed(name: str, tag: str | None = None) -> Function:
    return _fn(name, traffic=[TrafficTarget(f"{name}-00001", 100, tag)])


@pytest.mark.parametrize("order", [("hello", "canary-hello"), ("canary-hello", "hello")])
def test_gateway_prefers_the_function_over_a_tag_host_in_any_order(order: tuple[str, str]) -> None:
    table = RouteTable(Pools(), lambda f, r, q: None)
    fns = {"hello": _routed("hello", "canary"), "canary-hello": _routed("canary-hello")}
    for name in order:
        table.apply(name, fns[name], [])
    fr, rr = table.hosts["canary-hello"]
    assert fr.name == "canary-hello" and rr is None
    assert table.hosts["hello"][0].name == "hello"
    table.apply("hello", fns["hello"], [])  # a later change of the tagged function changes nothing
    assert table.hosts["canary-hello"][0].name == "canary-hello"
    # the function goes: the tag host answers for hello's tag again
    table.apply("canary-hello", None, [])
    fr, rr = table.hosts["canary-hello"]
    assert fr.name == "hello" and rr is not None and rr.name == "hello-00001"
    # the tag goes: the label is free
    table.apply("hello", _routed("hello"), [])
    assert "canary-hello" not in table.hosts


@pytest.mark.parametrize("order", [("b-c", "c"), ("c", "b-c")])
def test_gateway_two_tags_on_one_host_resolve_to_the_first_function_by_name(
    order: tuple[str, str],
) -> None:
    table = RouteTable(Pools(), lambda f, r, q: None)
    fns = {"b-c": _routed("b-c", "a"), "c": _routed("c", "a-b")}  # both a-b-c
    for name in order:
        table.apply(name, fns[name], [])
    assert table.hosts["a-b-c"][0].name == "b-c"
    table.apply("b-c", None, [])
    assert table.hosts["a-b-c"][0].name == "c"


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"websocket": "not a handler"}, "module:function"),
        ({"websocket": 3}, "module:function"),
        ({"websocket": "class:handle"}, "module:function"),
        ({"image": "myorg/app:1", "websocket": "ws:serve"}, "does not apply to an image"),
    ],
)
def test_websocket_handler_is_validated(data: dict[str, Any], words: str) -> None:
    err = spec_error(data)
    assert err.path == "websocket" and words in str(err)

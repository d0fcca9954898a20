"""One function's bad state stays its own: a real ``torpor up`` whose store holds a
poisoned function (a NaN scale target, as an earlier version let PATCH /scale store)
still wakes every other function from zero, and says what is wrong with the poisoned one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from platform_proc import function_copy, torpor_up

pytestmark = pytest.mark.slow


def _errors(t: Any, name: str) -> list[dict[str, Any]]:
    r = t.api_call("GET", f"/v1/functions/{name}/events", params={"limit": 200})
    r.raise_for_status()
    return [e for e in r.json()["events"] if e["kind"] == "error"]


@pytest.mark.security
def test_a_poisoned_function_does_not_stop_others_waking_from_zero(
    tmp_path: Path, attack: Any
) -> None:
    """A function whose stored scale target is NaN stalls the controller's pass, so no other function wakes from zero"""
    state = tmp_path / "state"
    with torpor_up(state) as t:
        t.deploy(function_copy(tmp_path, "hello", name="abad"))
        t.deploy(function_copy(tmp_path, "hello", scale={"idle": "1s"}))
    # Poison abad's record in the embedded store's file, as an unchecked PATCH left it:
    # "abad" sorts before "hello", and min 1 makes every pass ask the autoscaler about it.
    path = state / "functions" / "abad.json"
    doc = json.loads(path.read_text())
    doc["scale"] = {"min": 1, "max": None, "target": float("nan"), "concurrency": None}
    path.write_text(json.dumps(doc))
    assert "NaN" in path.read_text()

    with torpor_up(state) as t:
        assert not t.function("hello")["replicas"]  # the restart left it at zero
        try:
            r = t.request("hello", timeout=20)
            outcome = f"{r.status_code} cold-start={r.headers.get('x-torpor-cold-start')}"
        except httpx.HTTPError as e:
            r, outcome = None, f"no answer: {type(e).__name__}"
        attack.ended(f"hello woke: {outcome}")
        assert r is not None and r.status_code == 200 and r.headers["x-torpor-cold-start"] == "true"

        # the poisoned function: an error event naming the problem
        errors = t.wait_for(lambda: _errors(t, "abad"), 10, "an error event on abad")
        assert "scale.target" in errors[0]["message"] and "nan" in errors[0]["message"]
        assert errors[0]["message"].startswith("controller: reconciling abad failed: ValueError")
        attack.ended(f"abad: {errors[0]['message'][:90]}")
        # the API still shows it (the NaN as null, named) and lists everything
        fn = t.api_call("GET", "/v1/functions/abad")
        assert fn.status_code == 200 and fn.json()["scale"]["target"] is None
        assert any("scale_override.target" in p for p in fn.json()["problems"])
        listed = t.api_call("GET", "/v1/functions").json()["functions"]
        assert [f["name"] for f in listed] == ["abad", "hello"]
        # hello goes back to zero after its idle second: many passes later, still one event
        t.wait_for(lambda: not t.function("hello")["replicas"], 30, "hello back at zero")
        assert len(_errors(t, "abad")) == 1

        # repaired by hand: abad reconciles again and starts its min replica
        fixed = t.api_call("PATCH", "/v1/functions/abad/scale", json={"target": 10})
        assert fixed.status_code == 200
        t.wait_for(lambda: t.ready_replicas("abad"), 20, "abad's min replica")

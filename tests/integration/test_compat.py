"""Coming from OpenFaaS on the process driver: a real `torpor up`, the real CLI and the
sample stack file in tests/samples/openfaas (a python3-http function), plus the runtime
contract every replica sees."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from platform_proc import Torpor, torpor_up

pytestmark = pytest.mark.slow

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
STACK = SAMPLES / "openfaas" / "stack.yml"


@pytest.fixture
def up(tmp_path: Path):
    with torpor_up(tmp_path / "state") as t:
        yield t


def set_secret(up: Torpor, name: str, value: str, tmp_path: Path) -> None:
    f = tmp_path / f"{name}.txt"
    f.write_text(value)
    up.cli("secret", "set", name, "--from-file", str(f))


def test_openfaas_python3_http_stack_deploys_and_runs_as_the_template_does(
    up: Torpor, tmp_path: Path
) -> None:
    # the stack's secret does not exist yet: refused with its name, nothing deployed
    refused = up.cli("deploy", str(STACK), "--filter", "hello-py", check=False)
    assert refused.returncode != 0
    assert "api-key" in refused.stderr and "torpor secret set" in refused.stderr, refused.stderr
    # every unsupported key was named before the upload
    for named in (
        "functions.hello-py.annotations.topic",
        "functions.hello-py.constraints",
        "/var/openfaas/secrets/api-key",
    ):
        assert named in refused.stderr, refused.stderr
    set_secret(up, "api-key", "s3cret", tmp_path)
    r = up.cli("deploy", str(STACK), "--filter", "hello-py")
    assert r.stdout.strip() == f"http://hello-py.torpor.localhost:{up.port}/"
    assert "resizer" not in r.stderr  # --filter deployed one function only
    r = up.request("hello-py", "/items?name=a&name=b", headers={"User-Agent": "compat-test"})
    assert r.status_code == 200, r.text
    assert r.headers["x-handler"] == "openfaas"
    assert r.headers["content-type"] == "application/json"
    got = r.json()
    assert got == {
        "method": "GET",
        "path": "/items",
        "name": "a",
        "all": ["a", "b"],
        "agent": "compat-test",
        "body": "",
        "hostname": "localhost",
        "greeting": "HI",
        "six": True,
    }
    r = up.request("hello-py", "/", "POST", content=b"payload")
    assert r.json()["body"] == "payload" and r.json()["method"] == "POST"
    r = up.request("hello-py", "/plain")
    assert (r.status_code, r.text) == (200, "plain hi")
    assert r.headers["content-type"].startswith("text/html")
    r = up.request("hello-py", "/none")
    assert (r.status_code, r.content) == (200, b"")
    r = up.request("hello-py", "/status")
    assert (r.status_code, r.text, r.headers["x-kind"]) == (418, "teapot", "teapot")
    env = up.request("hello-py", "/env").json()
    assert env["K_SERVICE"] == env["K_CONFIGURATION"] == "hello-py"
    assert env["K_REVISION"] == "hello-py-00001"
    assert env["PORT"] and int(env["PORT"]) > 0
    assert env["REGION"] == "eu-west" and env["API_KEY"] == "s3cret"
    spec = up.function("hello-py")["revisions"][0]["spec"]
    assert (
        spec["handler_style"] == "openfaas"
        and spec["scale"]["min"] == 0
        and spec["scale"]["max"] == 4
    )

    # going back out: the stack entry and a Knative Service
    stack = yaml.safe_load(up.cli("export", "hello-py", "--format", "openfaas").stdout)
    entry = stack["functions"]["hello-py"]
    assert entry["lang"] == "python3-http"
    assert entry["labels"]["com.openfaas.scale.zero"] == "true"
    assert entry["labels"]["com.openfaas.scale.max"] == "4"
    assert entry["secrets"] == ["api-key"]
    svc = yaml.safe_load(up.cli("export", "hello-py", "--format", "knative").stdout)
    assert svc["apiVersion"] == "serving.knative.dev/v1" and svc["metadata"]["name"] == "hello-py"
    assert svc["spec"]["traffic"] == [{"revisionName": "hello-py-00001", "percent": 100}]


def test_a_file_that_is_neither_is_refused_clearly(up: Torpor, tmp_path: Path) -> None:
    other = tmp_path / "compose.yaml"
    other.write_text("services:\n  web:\n    image: nginx\n")
    r = up.cli("deploy", str(other), check=False)
    assert r.returncode != 0
    assert "neither a Knative Service" in r.stderr and "compose.yaml" in r.stderr
    r = up.cli("deploy", str(STACK), "--filter", "nope", check=False)
    assert r.returncode != 0 and "--filter 'nope': no such function" in r.stderr

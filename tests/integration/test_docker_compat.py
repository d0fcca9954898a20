"""Coming from Knative or OpenFaaS with images, on `torpor up --driver docker`: the
sample files in tests/samples, an image built here FROM the local base image (nothing
is pulled), and the runtime contract such a container relies on."""

from __future__ import annotations

import asyncio
import io
import shutil
import tarfile
import uuid
from pathlib import Path

import docker
import pytest
import yaml
from platform_proc import Torpor, torpor_up

from torpor.drivers.docker import DockerDriver
from torpor.model import Revision, Spec

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
IMAGE = "torpor-test/knative-hello:1"  # the name the Knative samples use
OPENFAAS_IMAGE = "torpor-test/openfaas-resizer:1"  # the stack's `lang: dockerfile` function

# A container written for Knative: serves HTTP on $PORT, knows nothing of Torpor.
SERVE = r"""
import http.server, json, os, select, signal, sys, tempfile

args = sys.argv[1:]
greeting = args[args.index("--greeting") + 1] if "--greeting" in args else "none"


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup():
    v2_mem, v2_cpu = read("/sys/fs/cgroup/memory.max"), read("/sys/fs/cgroup/cpu.max")
    if v2_mem is not None:
        quota, _, period = (v2_cpu or "max 100000").partition(" ")
        return {"memory": v2_mem, "cpu_quota": quota, "cpu_period": period}
    return {"memory": read("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
            "cpu_quota": read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
            "cpu_period": read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")}


def stdin_state():
    try:
        ready, _, _ = select.select([0], [], [], 0)
        return "eof" if ready and os.read(0, 1) == b"" else "open"
    except OSError:
        return "closed"


class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            with tempfile.NamedTemporaryFile(dir="/tmp") as f:
                f.write(b"x")
                tmp = True
        except OSError:
            tmp = False
        info = {
            "argv": sys.argv, "greeting": greeting, "tmp_writable": tmp, "stdin": stdin_state(),
            "env": {k: os.environ.get(k) for k in ("PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION",
                                                   "TARGET", "DB_PASSWORD")},
            "headers": {k.lower(): v for k, v in self.headers.items()}, "path": self.path, "cgroup": cgroup(),
        }
        body = json.dumps(info).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def on_term(*_):
    print("SIGTERM received", flush=True)
    if "--ignore-term" not in args:
        sys.exit(0)


signal.signal(signal.SIGTERM, on_term)
print("serving on", os.environ["PORT"], flush=True)
http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"""


@pytest.fixture(scope="module")
def engine():
    client = docker.from_env(timeout=60)
    client.ping()  # fails (not skips) without an engine: CI installs one
    yield client
    client.close()


@pytest.fixture(scope="module")
def images(engine):
    base = "torpor/python-base:bookworm"
    dockerfile = (
        f"FROM {base}\nCOPY serve.py /app/serve.py\nUSER 65534:65534\nEXPOSE 8080\n"
        'CMD ["python3", "/app/serve.py"]\n'
    )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in (("Dockerfile", dockerfile), ("serve.py", SERVE)):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    image, _ = engine.images.build(
        fileobj=buf, custom_context=True, tag=IMAGE, labels={"torpor.test": "1"}, rm=True
    )
    image.tag(OPENFAAS_IMAGE)
    yield IMAGE
    for tag in (IMAGE, OPENFAAS_IMAGE):
        try:
            engine.images.remove(tag, force=True)
        except docker.errors.DockerException:
            pass


@pytest.fixture
def up(tmp_path: Path, engine, images):
    with torpor_up(tmp_path / "state", driver="docker") as t:
        yield t
    from torpor.drivers.docker import INSTANCE, instance_id

    for c in engine.containers.list(
        all=True, filters={"label": f"{INSTANCE}={instance_id(tmp_path / 'state')}"}
    ):
        c.remove(force=True)


def set_secret(up: Torpor, name: str, value: str, tmp_path: Path) -> None:
    f = tmp_path / f"{name}.txt"
    f.write_text(value)
    up.cli("secret", "set", name, "--from-file", str(f))


def test_a_knative_service_runs_unchanged_with_the_runtime_contract(
    up: Torpor, tmp_path: Path, engine
) -> None:
    set_secret(up, "db-password", "hunter2", tmp_path)
    r = up.cli("deploy", str(SAMPLES / "knative" / "hello.yaml"))
    assert r.stdout.strip() == f"http://hello.torpor.localhost:{up.port}/"
    for named in (
        "spec.template.spec.nodeSelector: scheduling field, ignored",
        "spec.template.spec.tolerations",
        "containers[0].readinessProbe",
    ):
        assert named in r.stderr, r.stderr
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    host = f"hello.torpor.localhost:{up.port}"
    resp = up.request("hello", "/contract?x=1", headers={"traceparent": trace, "Host": host})
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert got["argv"] == ["/app/serve.py", "--greeting", "Hello"]  # command + args
    assert got["env"] == {
        "PORT": "8081",
        "K_SERVICE": "hello",
        "K_CONFIGURATION": "hello",
        "K_REVISION": "hello-00001",
        "TARGET": "World",
        "DB_PASSWORD": "hunter2",
    }
    h = got["headers"]
    assert h["host"] == host  # the client's Host
    assert h["traceparent"] == trace
    assert h["x-forwarded-proto"] == "http" and h["x-forwarded-for"] == "127.0.0.1"
    assert (
        "for=" in h["forwarded"]
        and "proto=http" in h["forwarded"]
        and f'host="{host}"' in h["forwarded"]
    )
    assert got["tmp_writable"] is True and got["stdin"] == "eof"
    cg = got["cgroup"]
    assert cg["memory"] == str(128 * 2**20)  # resources.limits.memory
    assert int(cg["cpu_quota"]) == int(cg["cpu_period"])  # limits.cpu "1"
    fn = up.function("hello")
    spec = fn["revisions"][0]["spec"]
    assert (
        spec["scale"]["max"] == 5
        and spec["scale"]["concurrency"] == 50
        and spec["labels"]["team"] == "web"
    )
    [c] = [
        c
        for c in engine.containers.list(
            filters={"label": ["torpor.function=hello", "torpor.revision=hello-00001"]}
        )
    ]
    assert c.labels["team"] == "web" and c.labels["app"] == "hello"
    out = yaml.safe_load(up.cli("export", "hello", "--format", "knative").stdout)
    container = out["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == IMAGE and container["args"] == ["--greeting", "Hello"]
    assert {
        "name": "DB_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": "db-password", "key": "db-password"}},
    } in container["env"]


def test_knative_traffic_blocks_and_a_container_that_never_becomes_ready(
    up: Torpor, tmp_path: Path
) -> None:
    # two Services in one file; greeter's traffic names a revision Torpor does not have: nothing is deployed
    r = up.cli("deploy", str(SAMPLES / "knative" / "two-services.yaml"), check=False)
    assert r.returncode != 0
    assert "spec.traffic names revision 'greeter-00001', which Torpor does not have" in r.stderr, (
        r.stderr
    )
    assert up.api_call("GET", "/v1/functions/echo").status_code == 404
    # split: a first revision, then the file's 80/20 split with a tag on the new one
    doc = yaml.safe_load((SAMPLES / "knative" / "split.yaml").read_text())
    first = dict(doc, spec={"template": {"spec": doc["spec"]["template"]["spec"]}})
    (tmp_path / "first.yaml").write_text(yaml.safe_dump(first))
    up.cli("deploy", str(tmp_path / "first.yaml"))
    up.cli("deploy", str(SAMPLES / "knative" / "split.yaml"))
    assert up.function("split")["traffic"] == [
        {"revision": "split-00001", "percent": 80, "tag": None},
        {"revision": "split-00002", "percent": 20, "tag": "blue"},
    ]
    assert up.request("split", "/", tag="blue").headers["x-torpor-revision"] == "split-00002"
    # a container that exits before it ever serves: the revision fails with the reason, traffic stays
    crash = dict(first)
    crash["spec"] = {
        "template": {
            "spec": {
                "containers": [
                    {
                        "image": IMAGE,
                        "command": [
                            "python3",
                            "-c",
                            "import sys; print('no port for you'); sys.exit(3)",
                        ],
                    }
                ]
            }
        }
    }
    (tmp_path / "crash.yaml").write_text(yaml.safe_dump(crash))
    r = up.cli("deploy", str(tmp_path / "crash.yaml"), check=False)
    assert r.returncode != 0 and "split-00003 failed" in r.stderr, r.stderr
    rev = up.function("split")["revisions"][2]
    assert rev["status"] == "failed"
    assert "exited before becoming ready" in rev["reason"] and "no port for you" in rev["reason"]
    assert up.function("split")["traffic"][0] == {
        "revision": "split-00001",
        "percent": 80,
        "tag": None,
    }


def test_openfaas_dockerfile_function_runs_its_image(up: Torpor) -> None:
    r = up.cli("deploy", str(SAMPLES / "openfaas" / "stack.yml"), "--filter", "resizer")
    assert "docker build -t torpor-test/openfaas-resizer:1" in r.stderr
    got = up.request("resizer", "/x").json()
    assert got["env"]["K_SERVICE"] == "resizer" and got["env"]["PORT"] == "8080"
    assert got["argv"] == ["/app/serve.py"]
    assert up.function("resizer")["revisions"][0]["spec"]["scale"]["min"] == 0


async def test_sigterm_then_the_grace_period_then_sigkill(tmp_path: Path, engine, images) -> None:
    """An image that ignores SIGTERM is killed once the grace period is over."""
    driver = DockerDriver(tmp_path / "state", pool_size=0)  # an image: never pooled
    name = f"term-{uuid.uuid4().hex[:6]}"
    rev = Revision(
        name=f"{name}-00001",
        function=name,
        number=1,
        spec=Spec(
            name=name,
            handler=None,
            image=IMAGE,
            command=["python3", "/app/serve.py"],
            args=["--ignore-term"],
        ),
    )
    try:
        rev = await driver.prepare(rev)
        running = await driver.start(rev, f"{rev.name}-r1")
        container = engine.containers.get(running.driver_id)
        for _ in range(200):
            if b"serving on" in container.logs():
                break
            await asyncio.sleep(0.05)
        stop = asyncio.create_task(driver.stop(running, grace=5))
        for _ in range(
            200
        ):  # SIGTERM arrived and was ignored: still running inside the grace period
            if b"SIGTERM received" in container.logs():
                break
            await asyncio.sleep(0.05)
        assert b"SIGTERM received" in container.logs()
        container.reload()
        assert container.status == "running"
        await asyncio.wait_for(stop, 60)  # SIGKILL after the grace period ends it
        with pytest.raises(docker.errors.NotFound):
            engine.containers.get(running.driver_id)
    finally:
        for r in await driver.list():
            await driver.stop(r, grace=0)
        await driver.remove(rev)
        await driver.close()
        shutil.rmtree(tmp_path / "state", ignore_errors=True)

"""`torpor up --driver docker` end to end: real images, real containers, real engine."""

from __future__ import annotations

import io
import re
import signal
import tarfile
import time
from pathlib import Path

import docker
import pytest
from platform_proc import Torpor, function_copy, torpor_up

from torpor.drivers.dockerpool import POOL_LABEL

pytestmark = [pytest.mark.docker, pytest.mark.slow]

IMAGE_FN_TAG = "torpor-test/plain-http:1"


@pytest.fixture(scope="module")
def engine():
    client = docker.from_env(timeout=30)
    client.ping()  # fails (not skips) without an engine: CI installs one
    yield client
    client.close()


@pytest.fixture(scope="module")
def plain_image(engine):
    """An image that knows nothing of Torpor: serves HTTP on $PORT (Cloud Run contract)."""
    base = "torpor/python-base:bookworm"
    server = (
        "import os, http.server, signal, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        body = b'plain image says hi\\n'\n"
        "        self.send_response(200); self.send_header('Content-Length', str(len(body)))\n"
        "        self.end_headers(); self.wfile.write(body)\n"
        "    def log_message(self, *a): pass\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "http.server.ThreadingHTTPServer(('0.0.0.0', int(os.environ['PORT'])), H).serve_forever()\n"
    )
    dockerfile = f'FROM {base}\nCOPY app.py /app.py\nUSER 65534:65534\nCMD ["python3", "/app.py"]\n'
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in (("Dockerfile", dockerfile), ("app.py", server)):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    engine.images.build(
        fileobj=buf, custom_context=True, tag=IMAGE_FN_TAG, labels={"torpor.test": "1"}, rm=True
    )
    yield IMAGE_FN_TAG
    try:
        engine.images.remove(IMAGE_FN_TAG, force=True)
    except docker.errors.DockerException:
        pass


@pytest.fixture(autouse=True)
def _cleanup(engine, tmp_path: Path):
    """Whatever a failed test left running on the engine goes (containers and images of its state dir)."""
    yield
    from torpor.drivers.docker import INSTANCE, instance_id

    mine = {"label": f"{INSTANCE}={instance_id(tmp_path / 'state')}"}
    for c in engine.containers.list(all=True, filters=mine):
        c.remove(force=True)
    for img in engine.api.images(filters=mine):
        try:
            engine.images.remove(img["Id"], force=True)
        except docker.errors.DockerException:
            pass


def containers(engine, function: str, state: Path) -> list:
    """This installation's containers of ``function`` (other runs may share the engine).

    The SDK lists, then inspects each container: one removed in between (scaled to zero,
    deleted) is a 404, and the listing is asked again (a few times, then it raises)."""
    from torpor.drivers.docker import INSTANCE, instance_id

    filters = {"label": [f"torpor.function={function}", f"{INSTANCE}={instance_id(state)}"]}
    # a replica made of a pool member: labelled torpor.pool (labels cannot change), named
    # torpor-REPLICA like every replica
    pooled = {"label": [POOL_LABEL, f"{INSTANCE}={instance_id(state)}"]}
    name = re.compile(rf"torpor-{re.escape(function)}-\d{{5}}-[0-9a-f]{{6}}")
    for attempt in range(5):
        try:
            return engine.containers.list(all=True, filters=filters) + [
                c
                for c in engine.containers.list(all=True, filters=pooled)
                if name.fullmatch(c.name)
            ]
        except docker.errors.NotFound:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def replica_of(c) -> str:
    """The replica a container is: its label, or (a pooled one) its name."""
    return c.labels.get("torpor.replica") or c.name.removeprefix("torpor-")


@pytest.mark.parametrize("pool", ["0", "10"], ids=["no-pool", "pool"])
def test_source_and_image_functions_run_as_locked_down_containers(
    tmp_path: Path, engine, plain_image, pool: str
) -> None:
    with torpor_up(tmp_path / "state", driver="docker", env={"TORPOR_DOCKER_POOL": pool}) as t:
        assert "driver=docker" in t.log.read_text()
        t.deploy(
            function_copy(
                tmp_path, "hello", scale={"idle": "3s"}, resources={"cpu": 0.5, "memory": "128Mi"}
            )
        )
        img_dir = tmp_path / "plain"
        img_dir.mkdir()
        (img_dir / "torpor.yaml").write_text(
            f"name: plain\nimage: {plain_image}\nscale: {{idle: 3s}}\n"
        )
        t.deploy(img_dir)
        for name, body in (("hello", "hello, world!\n"), ("plain", "plain image says hi\n")):
            r = t.request(name)
            assert r.status_code == 200 and r.text == body
            [c] = [c for c in containers(engine, name, t.state_dir) if c.status == "running"]
            labels = c.labels
            if pool != "0" and name == "hello":  # a source function: a pool member
                assert POOL_LABEL in labels and labels["torpor.function"] == "-pool"
                assert replica_of(c).startswith(f"{name}-00001-")
            else:
                assert labels["torpor.function"] == name
                assert labels["torpor.revision"] == f"{name}-00001"
                assert labels["torpor.replica"].startswith(f"{name}-00001-")
            hc = c.attrs["HostConfig"]
            assert hc["Memory"] > 0 and hc["NanoCpus"] > 0
            assert hc["ReadonlyRootfs"] is True and hc["Privileged"] is False
            assert c.attrs["Config"]["User"] not in ("", "0", "root")
            for binding in c.attrs["NetworkSettings"]["Ports"].values():
                assert all(b["HostIp"] == "127.0.0.1" for b in binding)
            mounts = [m.get("Source", "") for m in c.attrs.get("Mounts", [])]
            assert not any("docker.sock" in m for m in mounts)
        assert (
            engine.containers.get(containers(engine, "hello", t.state_dir)[0].id).attrs[
                "HostConfig"
            ]["Memory"]
            == 128 * 2**20
        )
        # idle -> no container; the next request cold-starts one
        t.wait_for(
            lambda: not [c for c in containers(engine, "hello", t.state_dir)],
            40,
            "hello containers gone after idle",
        )
        r = t.request("hello", "/?name=again")
        assert r.status_code == 200 and r.headers["x-torpor-cold-start"] == "true"
        logs = t.cli("logs", "hello").stdout
        assert "torpor-runtime: serving" in logs


@pytest.mark.parametrize("pool", ["0", "10"], ids=["no-pool", "pool"])
def test_kill_9_then_restart_keeps_exactly_the_expected_containers(
    tmp_path: Path, engine, pool: str
) -> None:
    state = tmp_path / "state"
    env = {"TORPOR_DOCKER_POOL": pool}
    t = Torpor(state, driver="docker", env=env).start()
    try:
        t.deploy(function_copy(tmp_path, "hello"))
        t.cli("scale", "hello", "--replicas", "2")
        t.wait_for(lambda: len(t.ready_replicas("hello")) == 2, 60, "2 ready replicas")
        before = sorted(replica_of(c) for c in containers(engine, "hello", state))
        assert len(before) == 2
    finally:
        t.stop(signal.SIGKILL)
    assert len(containers(engine, "hello", state)) == 2, (
        "containers must outlive a kill -9 of torpor up"
    )
    with torpor_up(state, driver="docker", env=env) as t2:
        t2.wait_for(lambda: len(t2.ready_replicas("hello")) == 2, 60, "adopted replicas ready")
        time.sleep(2)  # a few reconcile passes: nothing new may start
        after = sorted(replica_of(c) for c in containers(engine, "hello", state))
        assert after == before
        assert t2.request("hello").status_code == 200
    assert containers(engine, "hello", state) == [], (
        "torpor up's clean shutdown leaves no container"
    )
    from torpor.drivers.docker import INSTANCE, instance_id

    mine = {"label": [POOL_LABEL, f"{INSTANCE}={instance_id(state)}"]}
    assert engine.containers.list(all=True, filters=mine) == [], (
        "the pool's waiting members go with a clean shutdown, the killed run's with adoption"
    )


def test_broken_build_leaves_previous_revision_serving(tmp_path: Path, engine) -> None:
    with torpor_up(tmp_path / "state", driver="docker") as t:
        t.deploy(function_copy(tmp_path, "hello"))
        broken = function_copy(tmp_path, "hello", env={"GREETING": "broken"})
        (broken / "requirements.txt").write_text("this-package-does-not-exist-torpor==0.0.1\n")
        r = t.cli("deploy", str(broken), check=False)
        assert r.returncode != 0 and "failed" in r.stderr
        fn = t.function("hello")
        rev2 = fn["revisions"][1]
        assert rev2["status"] == "failed" and rev2["reason"]
        assert fn["traffic"] == [{"revision": "hello-00001", "percent": 100, "tag": None}]
        assert "failed" in t.cli("describe", "hello").stdout
        r = t.request("hello")
        assert r.status_code == 200 and r.headers["x-torpor-revision"] == "hello-00001"
        # a revision whose container exits at start is failed too, with the reason
        crash = function_copy(tmp_path, "hello")
        (crash / "handler.py").write_text("raise RuntimeError('boom at import')\n")
        r = t.cli("deploy", str(crash), check=False)
        assert r.returncode != 0
        rev3 = t.function("hello")["revisions"][2]
        assert rev3["status"] == "failed" and "boom at import" in rev3["reason"]
        assert t.request("hello").headers["x-torpor-revision"] == "hello-00001"


def test_delete_removes_containers_and_images(tmp_path: Path, engine) -> None:
    with torpor_up(tmp_path / "state", driver="docker") as t:
        t.deploy(function_copy(tmp_path, "echo"))
        assert t.request("echo", "/", "POST", content=b"x").status_code == 200
        from torpor.drivers.docker import INSTANCE, instance_id

        mine = {"label": ["torpor.function=echo", f"{INSTANCE}={instance_id(t.state_dir)}"]}
        images = engine.api.images(filters=mine)  # low-level: no inspect race with the removal
        assert images
        t.cli("delete", "echo")
        t.wait_for(lambda: not containers(engine, "echo", t.state_dir), 30, "containers removed")
        t.wait_for(lambda: not engine.api.images(filters=mine), 30, "images removed")

"""The kubernetes driver's Pod and owner manifests, and how it reads Pods back (pure)."""

from __future__ import annotations

from typing import Any

import pytest
from lightkube.resources.core_v1 import Pod

from torpor.drivers.base import BuildError
from torpor.drivers.kubernetes import (
    PodSettings,
    cpu_quantity,
    grace_seconds,
    label_value,
    memory_quantity,
    owner_manifest,
    pod_manifest,
    running_of,
)
from torpor.model import MiB, Resources, Revision, Spec
from torpor.sources import archive_token, token_matches

SHA = "a" * 64
KEY = bytes(range(32))
SETTINGS = PodSettings(
    instance="inst0123abcd",
    namespace="fns",
    runtime_image="registry.example/torpor/runtime:1",
    archive_url_base="http://torpor-api.torpor.svc:8081/v1/archives/",
    archive_key=KEY,
)


def rev(**spec_kw: Any) -> Revision:
    image = spec_kw.pop("image", None)
    spec = Spec(name="hello", image=image, env={"GREETING": "hi"}, **spec_kw)
    return Revision(
        name="hello-00003",
        function="hello",
        number=3,
        spec=spec,
        source="/src/hello-00003",
        source_sha256=None if image else SHA,
        created=1700000000.25,
    )


def pod(r: Revision | None = None, settings: PodSettings = SETTINGS) -> dict[str, Any]:
    return pod_manifest(r or rev(), "hello-00003-abc123", "owner-uid-1", settings).to_dict()


def env_of(p: dict[str, Any]) -> dict[str, Any]:
    return {
        e["name"]: e.get("value", e.get("valueFrom")) for e in p["spec"]["containers"][0]["env"]
    }


def test_labels_are_those_of_the_docker_driver() -> None:
    p = pod()
    assert p["metadata"]["name"] == "torpor-hello-00003-abc123"
    assert p["metadata"]["namespace"] == "fns"
    assert p["metadata"]["labels"] == {
        "torpor.managed": "true",
        "torpor.instance": "inst0123abcd",
        "torpor.function": "hello",
        "torpor.revision": "hello-00003",
        "torpor.replica": "hello-00003-abc123",
    }
    assert p["metadata"]["annotations"]["torpor.replica"] == "hello-00003-abc123"


def test_long_names_are_shortened_in_labels_and_kept_whole_in_annotations() -> None:
    name = "f" * 63
    r = Revision(
        name=f"{name}-00001", function=name, number=1, spec=Spec(name=name), source_sha256=SHA
    )
    replica = f"{name}-00001-abcdef"
    p = pod_manifest(r, replica, "uid", SETTINGS)
    labels = p.metadata.labels  # type: ignore[union-attr]
    assert labels is not None
    assert all(len(v) <= 63 for v in labels.values())
    assert labels["torpor.replica"] != label_value(f"{name}-00001-abcdee")  # still unique
    assert p.metadata.annotations["torpor.replica"] == replica  # type: ignore[union-attr,index]
    p.status = None
    assert running_of(p).replica == replica and running_of(p).revision == f"{name}-00001"


def test_pod_and_container_are_hardened() -> None:
    p = pod()
    spec = p["spec"]
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65534,
        "runAsGroup": 65534,
        "fsGroup": 65534,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert spec["restartPolicy"] == "Never"
    assert "hostNetwork" not in spec and "hostPID" not in spec and "serviceAccountName" not in spec
    c = spec["containers"][0]
    assert c["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65534,
        "runAsGroup": 65534,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert spec["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}]


@pytest.mark.parametrize(
    ("cpu", "memory", "want_cpu", "want_mem"),
    [
        (0.5, 256 * MiB, "500m", "256Mi"),
        (2.0, 2048 * MiB, "2", "2Gi"),
        (0.25, 1536 * MiB, "250m", "1536Mi"),
        (0.0001, 1000, "1m", "1000"),
    ],
)
def test_resources_become_requests_and_limits(
    cpu: float, memory: int, want_cpu: str, want_mem: str
) -> None:
    assert cpu_quantity(cpu) == want_cpu and memory_quantity(memory) == want_mem
    p = pod(rev(resources=Resources(cpu=cpu, memory=memory)))
    res = p["spec"]["containers"][0]["resources"]
    assert res == {
        "requests": {"cpu": want_cpu, "memory": want_mem},
        "limits": {"cpu": want_cpu, "memory": want_mem},
    }


def test_the_pod_is_owned_by_its_revisions_configmap() -> None:
    assert pod()["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": "torpor-rev-hello-00003",
            "uid": "owner-uid-1",
            "blockOwnerDeletion": False,
            "controller": False,
        }
    ]
    cm = owner_manifest(rev(), SETTINGS).to_dict()
    assert cm["metadata"]["name"] == "torpor-rev-hello-00003"
    assert cm["metadata"]["labels"]["torpor.instance"] == "inst0123abcd"
    assert "torpor.replica" not in cm["metadata"]["labels"]
    assert cm["metadata"]["annotations"]["torpor.created"] == "1700000000.250000"
    assert cm["data"] == {"function": "hello", "revision": "hello-00003", "archive_sha256": SHA}


def test_a_source_function_runs_the_runtime_image_with_its_archive() -> None:
    p = pod()
    c = p["spec"]["containers"][0]
    assert c["image"] == "registry.example/torpor/runtime:1"
    env = env_of(p)
    assert env["TORPOR_ARCHIVE_URL"] == f"http://torpor-api.torpor.svc:8081/v1/archives/{SHA}"
    assert env["TORPOR_ARCHIVE_SHA256"] == SHA
    assert env["TORPOR_FETCH_DIR"] == "/tmp/fn"
    assert env["TORPOR_HOST"] == "0.0.0.0"
    assert env["TORPOR_HANDLER"] == "handler:handle"
    assert (env["PORT"], env["GREETING"]) == ("8080", "hi")
    assert (env["TORPOR_FUNCTION"], env["TORPOR_REVISION"], env["TORPOR_REPLICA"]) == (
        "hello",
        "hello-00003",
        "hello-00003-abc123",
    )
    assert (env["K_SERVICE"], env["K_REVISION"]) == ("hello", "hello-00003")
    assert c["ports"] == [{"containerPort": 8080, "name": "http", "protocol": "TCP"}]
    assert c["readinessProbe"] == {
        "httpGet": {"path": "/_torpor/health", "port": 8080},
        "periodSeconds": 1,
        "timeoutSeconds": 1,
        "failureThreshold": 3,
    }


def test_the_download_token_is_the_archives_own_read_only_token() -> None:
    env = env_of(pod())
    assert env["TORPOR_ARCHIVE_TOKEN"] == archive_token(KEY, SHA)
    assert token_matches(KEY, SHA, env["TORPOR_ARCHIVE_TOKEN"])
    assert not token_matches(
        KEY, "b" * 64, env["TORPOR_ARCHIVE_TOKEN"]
    )  # good for this archive only
    other = PodSettings(**{**SETTINGS.__dict__, "archive_key": b"another installation's key......"})
    assert env_of(pod(settings=other))["TORPOR_ARCHIVE_TOKEN"] != env["TORPOR_ARCHIVE_TOKEN"]
    assert "TORPOR_ARCHIVE_TOKEN" not in env_of(pod(rev(image="registry.example/me/hello:2")))


def test_without_the_archive_key_a_source_pod_is_refused() -> None:
    settings = PodSettings(**{**SETTINGS.__dict__, "archive_key": None})
    with pytest.raises(BuildError, match="no archive key"):
        pod(settings=settings)


def test_an_image_function_runs_its_image_with_a_tcp_probe() -> None:
    p = pod(rev(image="registry.example/me/hello:2", port=9000))
    c = p["spec"]["containers"][0]
    assert c["image"] == "registry.example/me/hello:2"
    env = env_of(p)
    assert env["PORT"] == "9000"
    assert not {"TORPOR_ARCHIVE_URL", "TORPOR_HOST", "TORPOR_HANDLER"} & set(env)
    assert c["readinessProbe"]["tcpSocket"] == {"port": 9000}


def test_grace_covers_the_runtimes_drain() -> None:
    assert grace_seconds(Spec(name="x", timeout=10)) == 35
    assert grace_seconds(Spec(name="x", timeout=120.5)) == 126
    p = pod(rev(timeout=120))
    assert p["spec"]["terminationGracePeriodSeconds"] == 125
    assert env_of(p)["TORPOR_DRAIN_TIMEOUT"] == "120"


def test_a_source_revision_without_an_archive_hash_is_a_build_error() -> None:
    r = rev()
    r.source_sha256 = None
    with pytest.raises(BuildError, match="no archive hash"):
        pod_manifest(r, "hello-00003-abc123", "uid", SETTINGS)
    with pytest.raises(BuildError, match="TORPOR_ARCHIVE_URL_BASE"):
        pod_manifest(rev(), "hello-00003-abc123", "uid", PodSettings("i", "ns", "img"))


def _pod_state(
    phase: str,
    *,
    ip: str | None = "10.1.2.3",
    state: dict[str, Any] | None = None,
    deleting: bool = False,
) -> Pod:
    p = pod_manifest(rev(), "hello-00003-abc123", "uid", SETTINGS).to_dict()
    p["metadata"]["uid"] = "pod-uid"
    if deleting:
        p["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status["podIP"] = ip
    if state is not None:
        status["containerStatuses"] = [
            {
                "name": "function",
                "image": "i",
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": state,
            }
        ]
    p["status"] = status
    return Pod.from_dict(p)  # type: ignore[return-value]


def test_reading_pods_back() -> None:
    r = running_of(_pod_state("Running", state={"running": {}}))
    assert (r.alive, r.endpoint, r.driver_id, r.exit_code) == (
        True,
        "10.1.2.3:8080",
        "pod-uid",
        None,
    )
    r = running_of(_pod_state("Pending", ip=None))
    assert r.alive and r.endpoint == ""
    r = running_of(_pod_state("Failed", state={"terminated": {"exitCode": 3}}))
    assert not r.alive and r.exit_code == 3
    assert not running_of(_pod_state("Running", deleting=True)).alive  # being deleted: replace it
    r = running_of(_pod_state("Pending", state={"waiting": {"reason": "ImagePullBackOff"}}))
    assert not r.alive and r.exit_code is None
    assert running_of(
        _pod_state("Pending", state={"waiting": {"reason": "ContainerCreating"}})
    ).alive
    assert running_of(_pod_state("Running", ip="fd00::7")).endpoint == "[fd00::7]:8080"


def test_revision_archive_hash_round_trips() -> None:
    r = rev()
    assert Revision.from_dict(r.to_dict()).source_sha256 == SHA
    d = r.to_dict()
    del d["source_sha256"]  # a record stored before the field existed
    assert Revision.from_dict(d).source_sha256 is None


def test_resolved_secrets_reach_the_container_env() -> None:
    p = pod_manifest(
        rev(), "hello-00003-abc123", "uid", SETTINGS, {"DB_PASSWORD": "s3cret-value"}
    ).to_dict()
    env = {e["name"]: e.get("value") for e in p["spec"]["containers"][0]["env"]}
    assert env["DB_PASSWORD"] == "s3cret-value"


def test_the_knative_contract_command_args_and_labels_reach_the_pod() -> None:
    p = pod(
        rev(
            image="registry.example/me/hello:2",
            command=["/bin/app"],
            args=["--port", "8080"],
            labels={"team": "web", "app.kubernetes.io/name": "hello"},
        )
    )
    env = env_of(p)
    assert (env["K_SERVICE"], env["K_CONFIGURATION"], env["K_REVISION"]) == (
        "hello",
        "hello",
        "hello-00003",
    )
    c = p["spec"]["containers"][0]
    assert c["command"] == ["/bin/app"] and c["args"] == ["--port", "8080"]
    labels = p["metadata"]["labels"]
    assert labels["team"] == "web" and labels["app.kubernetes.io/name"] == "hello"
    assert labels["torpor.function"] == "hello"
    src = pod(rev(handler_style="openfaas"))
    assert env_of(src)["TORPOR_HANDLER_STYLE"] == "openfaas"
    assert (
        "command" not in src["spec"]["containers"][0]
    )  # a source function runs the runtime image's own
    assert "TORPOR_HANDLER_STYLE" not in env_of(pod())


def test_every_torpor_env_var_of_a_source_pod_is_read_by_the_runtime() -> None:
    """No drift between the Pod the driver writes and the runtime image's code: each
    TORPOR_* name it sets is read by platform/runtime (parsed from the source), but for the
    names that tell the function's own code who it is."""
    from chart_tools import ROOT, env_names_read

    for_the_function = {"TORPOR_FUNCTION", "TORPOR_REVISION", "TORPOR_REPLICA"}
    read = env_names_read(ROOT / "platform" / "runtime")
    names = {e["name"] for e in pod()["spec"]["containers"][0]["env"]}
    torpor = {n for n in names if n.startswith("TORPOR_")}
    assert {"TORPOR_ARCHIVE_URL", "TORPOR_HANDLER", "TORPOR_ARCHIVE_TOKEN"} <= torpor
    assert not torpor - read - for_the_function, sorted(torpor - read - for_the_function)


def test_pull_policy_applies_to_the_runtime_image_and_pull_secrets_to_every_pod() -> None:
    settings = PodSettings(
        **{
            **SETTINGS.__dict__,
            "runtime_pull_policy": "Always",
            "image_pull_secrets": ("regcred", "mirror"),
        }
    )
    src = pod(settings=settings)
    assert src["spec"]["containers"][0]["imagePullPolicy"] == "Always"
    assert src["spec"]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    img = pod(rev(image="docker.io/library/nginx:1"), settings)
    assert (
        "imagePullPolicy" not in img["spec"]["containers"][0]
    )  # the kubelet's default for the user's image
    assert img["spec"]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    assert "imagePullSecrets" not in pod()["spec"]


def test_a_pod_is_ready_only_alive_with_its_ready_condition_true() -> None:
    from torpor.drivers.kubernetes import is_ready

    def status(phase: str, ready: str, deleting: bool = False) -> Pod:
        meta: dict[str, Any] = (
            {"name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z"}
            if deleting
            else {"name": "p"}
        )
        pod = Pod.from_dict(
            {
                "metadata": meta,
                "status": {
                    "phase": phase,
                    "podIP": "10.0.0.7",
                    "conditions": [
                        {"type": "PodScheduled", "status": "True"},
                        {"type": "Ready", "status": ready},
                    ],
                },
            }
        )
        assert isinstance(pod, Pod)
        return pod

    assert is_ready(status("Running", "True"))
    assert not is_ready(status("Running", "False"))
    assert not is_ready(status("Succeeded", "True"))
    assert not is_ready(status("Running", "True", deleting=True))
    assert not is_ready(Pod.from_dict({"metadata": {"name": "p"}}))

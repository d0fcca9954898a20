"""charts/torpor rendered with scripts/render-chart (no cluster): every document of several
value sets validates strictly against the Kubernetes 1.30 schemas, and the manifests say
what cluster mode promises: three Deployments, a hardened container everywhere, RBAC
limited to what the kubernetes driver does, function Pods reachable from gateways only,
a Redis StatefulSet that redis.url switches off, the API token from a Secret.
"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from chart_tools import (
    CHART,
    ROOT,
    Doc,
    containers,
    env_names_read,
    env_of,
    of_kind,
    one,
    pod_spec,
    render,
    run_render,
    secret_value,
    selects,
    workloads,
)

from torpor.api.app import ApiConfig, function_url
from torpor.api.guard import HostPolicy
from torpor.cli.main import build_parser
from torpor.up import check_public_url

KUBE = "1.30.0"
EXTERNAL = "redis://x:6379/0"
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
DEPLOYMENTS = {"gateway", "api", "controller"}


def _values_file(tmp: Path) -> Path:
    f = tmp / "values.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "imagePullSecrets": [{"name": "regcred"}],
                "redis": {"persistence": {"enabled": False}, "auth": {"enabled": False}},
                "networkPolicy": {
                    "functionsFromController": True,
                    "apiFrom": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}
                            }
                        }
                    ],
                },
                "gateway": {
                    "pdb": {"minAvailable": "50%"},
                    "extraArgs": ["--log-level=debug"],
                    "extraEnv": [{"name": "EXTRA", "value": "1"}],
                },
            }
        )
    )
    return f


VALUE_SETS: dict[str, list[str]] = {
    "defaults": [],
    "external-redis": ["--set", f"redis.url={EXTERNAL}"],
    "external-redis-secret": ["--set", "redis.existingSecret=redis-url"],
    "ingress-disabled": ["--set", "ingress.enabled=false"],
    "hpa-disabled": ["--set", "gateway.autoscaling.enabled=false", "--set", "gateway.replicas=3"],
    "custom-domain": [
        "--set",
        "domain=fn.acme.example",
        "--set",
        "ingress.className=nginx",
        "--set",
        "ingress.tls.enabled=true",
        "--set",
        "ingress.tls.secretName=wildcard",
    ],
    "existing-secret": [
        "--set",
        "api.existingSecret=my-token",
        "--set",
        "api.existingSecretKey=bearer",
    ],
    "release-prod": ["--release", "prod", "--namespace", "functions"],
    "no-ids": [
        "--set",
        "podSecurity.runAsUser=null",
        "--set",
        "podSecurity.runAsGroup=null",
        "--set",
        "podSecurity.fsGroup=null",
    ],
    "values-file": ["-f", "<values-file>"],
    "no-networkpolicy": ["--set", "networkPolicy.enabled=false"],
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Doc]]:
    vf = _values_file(tmp_path_factory.mktemp("values"))
    return {
        name: render(*[str(vf) if a == "<values-file>" else a for a in args])
        for name, args in VALUE_SETS.items()
    }


@pytest.fixture(scope="module")
def docs(rendered: dict[str, list[Doc]]) -> list[Doc]:
    return rendered["defaults"]


def deployment(docs: list[Doc], component: str, prefix: str = "torpor") -> Doc:
    return one(docs, "Deployment", f"{prefix}-{component}")


def container(docs: list[Doc], component: str, prefix: str = "torpor") -> Doc:
    return pod_spec(deployment(docs, component, prefix))["containers"][0]


def pods_labels(docs: list[Doc]) -> dict[str, dict[str, str]]:
    return {
        w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads(docs)
    }


# -- schema ---------------------------------------------------------------------------
@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_every_document_validates_strictly_against_kubernetes_1_30(
    rendered: dict[str, list[Doc]], value_set: str
) -> None:
    docs = rendered[value_set]
    assert len(docs) >= 10
    for d in docs:
        try:
            kubernetes_validate.validate(d, KUBE, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{value_set}: {d['kind']}/{d['metadata']['name']}: {e.message} at "
                f"{'.'.join(map(str, e.path))}"
            )


def test_strict_validation_rejects_an_unknown_field(docs: list[Doc]) -> None:
    """The check above can fail: a field Kubernetes does not know is refused."""
    bad = yaml.safe_load(yaml.safe_dump(deployment(docs, "gateway")))
    pod_spec(bad)["containers"][0]["securityContext"]["runAsRoot"] = False
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE, strict=True)


def test_defaults_render_every_part(docs: list[Doc]) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for expected in [
        ("Deployment", "torpor-gateway"),
        ("Deployment", "torpor-api"),
        ("Deployment", "torpor-controller"),
        ("StatefulSet", "torpor-redis"),
        ("Service", "torpor-gateway"),
        ("Service", "torpor-api"),
        ("Service", "torpor-redis"),
        ("HorizontalPodAutoscaler", "torpor-gateway"),
        ("PodDisruptionBudget", "torpor-gateway"),
        ("Ingress", "torpor-gateway"),
        ("Secret", "torpor-api"),
        ("Secret", "torpor-redis"),
        ("ServiceAccount", "torpor"),
        ("Role", "torpor-controller"),
        ("RoleBinding", "torpor-controller"),
        ("NetworkPolicy", "torpor-functions"),
        ("NetworkPolicy", "torpor-redis"),
        ("NetworkPolicy", "torpor-api"),
    ]:
        assert expected in kinds
    assert all(d["metadata"]["namespace"] == "default" for d in docs)


@pytest.mark.parametrize(
    "value_set,prefix", [("defaults", "torpor"), ("release-prod", "prod-torpor")]
)
def test_the_three_deployments_are_named_gateway_api_controller(
    rendered: dict[str, list[Doc]], value_set: str, prefix: str
) -> None:
    names = {d["metadata"]["name"] for d in of_kind(rendered[value_set], "Deployment")}
    assert names == {f"{prefix}-{c}" for c in DEPLOYMENTS}


def test_controller_runs_two_replicas_in_its_namespace_with_the_runtime_image(
    docs: list[Doc],
) -> None:
    assert deployment(docs, "controller")["spec"]["replicas"] == 2
    env = env_of(container(docs, "controller"))
    assert env["TORPOR_K8S_NAMESPACE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}
    }
    assert env["TORPOR_RUNTIME_IMAGE"]["value"] == f"torpor/runtime:{APP_VERSION}"
    assert env["TORPOR_DRIVER"]["value"] == "kubernetes"
    assert (
        env["TORPOR_ARCHIVE_URL_BASE"]["value"] == "http://torpor-api.default.svc:8081/v1/archives"
    )
    assert env["TORPOR_K8S_READINESS"]["value"] == "kubelet"


def test_images_default_to_the_app_version_and_follow_values() -> None:
    docs = render()
    assert {container(docs, c)["image"] for c in DEPLOYMENTS} == {f"torpor/torpor:{APP_VERSION}"}
    docs = render(
        "--set",
        "image.repository=reg.example/torpor",
        "--set",
        "image.tag=1.2.3",
        "--set",
        "runtime.image.tag=1.2.3",
    )
    assert {container(docs, c)["image"] for c in DEPLOYMENTS} == {"reg.example/torpor:1.2.3"}
    assert (
        env_of(container(docs, "controller"))["TORPOR_RUNTIME_IMAGE"]["value"]
        == "torpor/runtime:1.2.3"
    )


@pytest.mark.parametrize("value_set", ["defaults", "values-file", "external-redis"])
def test_container_args_are_flags_the_torpor_cli_accepts(
    rendered: dict[str, list[Doc]], value_set: str
) -> None:
    docs = rendered[value_set]
    for component in DEPLOYMENTS:
        c = container(docs, component)
        assert c["command"] == ["torpor"]
        args = build_parser().parse_args(c["args"])  # SystemExit on a flag the CLI lacks
        assert args.cmd == component
        assert args.state_dir == "/var/lib/torpor"
        mounted = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/tmp", "/var/lib/torpor"} <= mounted
        if component == "gateway":
            assert (args.host, args.port) == ("0.0.0.0", 8080)
        if component == "api":
            assert (args.api_host, args.api_port) == ("0.0.0.0", 8081)


# Env the chart sets that no Torpor code reads, each with why.
NOT_READ_BY_CODE = {
    # only expanded by the kubelet into TORPOR_REDIS's $(TORPOR_REDIS_PASSWORD)
    "TORPOR_REDIS_PASSWORD": "kubelet",
}
# The controller's health endpoint (`torpor controller --health-port N`, GET /healthz and
# /readyz): a contract the controller's lease and fail-over work implements.
HEALTH_CONTRACT = {"TORPOR_HEALTH_PORT"}


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_every_torpor_env_var_the_chart_sets_is_one_the_code_reads(
    rendered: dict[str, list[Doc]], value_set: str
) -> None:
    """No drift between the chart and the code: each TORPOR_* name a chart container gets
    is read by platform/ or gateway/ (parsed from the source, the runtime left out: it runs
    in function Pods, not in the chart's)."""
    read = env_names_read(
        ROOT / "platform", ROOT / "gateway", exclude=(ROOT / "platform" / "runtime",)
    )
    assert {"TORPOR_REDIS", "TORPOR_DRIVER", "TORPOR_PUBLIC_URL"} <= read  # the scan itself works
    prefix = "prod-torpor" if value_set == "release-prod" else "torpor"
    for component in DEPLOYMENTS:
        c = container(rendered[value_set], component, prefix)
        names = {e["name"] for e in c["env"] if e["name"].startswith("TORPOR_")}
        unknown = names - read - set(NOT_READ_BY_CODE) - HEALTH_CONTRACT
        assert not unknown, (
            f"{value_set}: {component} gets {sorted(unknown)}, which no Torpor code reads"
        )


def test_the_controller_serves_the_health_contract_its_probes_use(docs: list[Doc]) -> None:
    c = container(docs, "controller")
    (port,) = [p for p in c["ports"] if p["name"] == "health"]
    assert env_of(c)["TORPOR_HEALTH_PORT"]["value"] == str(port["containerPort"]) == "8082"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    # a standby controller is ready too (/readyz: store reachable and synced, leader or not):
    # no Service routes to the controller, so readiness only gates rollouts of the Deployment
    assert not [
        s
        for s in of_kind(docs, "Service")
        if selects({"matchLabels": s["spec"]["selector"]}, pods_labels(docs)["torpor-controller"])
    ]


@pytest.mark.parametrize("value_set", ["defaults", "release-prod"])
def test_function_pods_reach_the_api_at_the_archive_url(
    rendered: dict[str, list[Doc]], value_set: str
) -> None:
    """The archive URL the driver gives function Pods names the API Service and port; the
    API answers to that Host (it refuses unknown names) and its NetworkPolicy admits
    function Pods on that port."""
    docs = rendered[value_set]
    prefix = "prod-torpor" if value_set == "release-prod" else "torpor"
    ns = docs[0]["metadata"]["namespace"]
    base = env_of(container(docs, "controller", prefix))["TORPOR_ARCHIVE_URL_BASE"]["value"]
    m = re.fullmatch(r"http://([a-z0-9.-]+):(\d+)/v1/archives", base)
    assert m, base
    host, port = m[1], int(m[2])
    assert host == f"{prefix}-api.{ns}.svc"
    svc = one(docs, "Service", f"{prefix}-api")
    (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    api = container(docs, "api", prefix)
    assert svc_port["targetPort"] in {p["name"] for p in api["ports"]}
    env = env_of(api)
    hosts = HostPolicy("0.0.0.0", env["TORPOR_API_ALLOWED_HOSTS"]["value"].split(","))
    assert hosts.allows(f"{host}:{port}") and hosts.allows(f"{prefix}-api:{port}")
    assert not hosts.allows("evil.example") and not hosts.allows(
        f"{prefix}-api.{ns}.svc.evil.example"
    )
    pol = one(docs, "NetworkPolicy", f"{prefix}-api")
    assert _peers_allow(pol, FUNCTION_POD)
    assert [p["port"] for p in pol["spec"]["ingress"][0]["ports"]] == [svc_port["targetPort"]]


def test_the_public_url_is_one_the_api_accepts(rendered: dict[str, list[Doc]]) -> None:
    for value_set, shown in (
        ("defaults", "http://hello.torpor.example.com/"),
        ("custom-domain", "https://hello.fn.acme.example/"),
    ):
        env = env_of(container(rendered[value_set], "api"))
        url = check_public_url(env["TORPOR_PUBLIC_URL"]["value"])
        cfg = ApiConfig(
            state_dir=Path("unused"),
            token="t" * 20,
            gateway_url=url,
            domain=env["TORPOR_DOMAIN"]["value"],
        )
        assert function_url(cfg, "hello") == shown


# -- hardening ------------------------------------------------------------------------
def _port_names(c: Doc) -> set[object]:
    return {p.get("name") for p in c.get("ports", [])} | {
        p["containerPort"] for p in c.get("ports", [])
    }


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_every_container_is_hardened_with_resources_and_probes(
    rendered: dict[str, list[Doc]], value_set: str
) -> None:
    docs = rendered[value_set]
    assert workloads(docs)
    for w in workloads(docs):
        where = f"{value_set}: {w['kind']}/{w['metadata']['name']}"
        pod = pod_spec(w)
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["enableServiceLinks"] is False, where
        for c in containers(w):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged", False) is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), where
            for probe in ("livenessProbe", "readinessProbe"):
                p = c[probe]
                handler = p.get("httpGet") or p.get("tcpSocket")
                if handler is not None:  # the probe's port is one the container declares
                    assert handler["port"] in _port_names(c), (
                        f"{where}: {probe} port {handler['port']}"
                    )
                else:
                    assert p["exec"]["command"], where


def test_uids_are_set_by_default_and_can_be_dropped_without_losing_the_hardening(
    rendered: dict[str, list[Doc]],
) -> None:
    gw = container(rendered["defaults"], "gateway")["securityContext"]
    assert (gw["runAsUser"], gw["runAsGroup"]) == (10001, 10001)
    redis = pod_spec(one(rendered["defaults"], "StatefulSet", "torpor-redis"))
    assert (redis["securityContext"]["runAsUser"], redis["securityContext"]["fsGroup"]) == (
        999,
        999,
    )
    for c in DEPLOYMENTS:
        sc = container(rendered["no-ids"], c)["securityContext"]
        assert "runAsUser" not in sc and "runAsGroup" not in sc
        assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
        assert "fsGroup" not in pod_spec(deployment(rendered["no-ids"], c))["securityContext"]


def test_only_the_controller_mounts_a_service_account_token(rendered: dict[str, list[Doc]]) -> None:
    for value_set in ("defaults", "values-file"):
        docs = rendered[value_set]
        sa = one(docs, "ServiceAccount", "torpor")
        assert sa["automountServiceAccountToken"] is False
        for w in workloads(docs):
            spec = pod_spec(w)
            assert spec["serviceAccountName"] == "torpor"
            assert spec["automountServiceAccountToken"] is (
                w["metadata"]["name"] == "torpor-controller"
            )


# -- RBAC -----------------------------------------------------------------------------
# tests/integration/test_kubernetes_driver.py checks these against the requests the driver makes
EXPECTED_RULES = sorted(
    [
        ("", "pods", ("create", "delete", "get", "list", "watch")),
        ("", "pods/log", ("get",)),
        ("", "configmaps", ("create", "delete", "get", "watch")),
    ]
)


def test_role_grants_exactly_what_the_driver_uses(docs: list[Doc]) -> None:
    role = one(docs, "Role", "torpor-controller")
    got = []
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, (
            rule
        )  # no resourceNames/nonResourceURLs
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                got.append((group, resource, tuple(sorted(rule["verbs"]))))
    assert sorted(got) == EXPECTED_RULES


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_no_cluster_wide_access_and_no_wildcards(
    rendered: dict[str, list[Doc]], value_set: str
) -> None:
    docs = rendered[value_set]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    for role in of_kind(docs, "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (value_set, rule)
                assert not any("*" in x for x in rule[field]), (value_set, rule)
            assert "secrets" not in rule["resources"]


@pytest.mark.parametrize("value_set,ns", [("defaults", "default"), ("release-prod", "functions")])
def test_rolebinding_binds_the_role_to_the_controllers_service_account(
    rendered: dict[str, list[Doc]], value_set: str, ns: str
) -> None:
    docs = rendered[value_set]
    (binding,) = of_kind(docs, "RoleBinding")
    (role,) = of_kind(docs, "Role")
    (sa,) = of_kind(docs, "ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": ns}
    ]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == ns
    ctl = next(
        d for d in of_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-controller")
    )
    assert pod_spec(ctl)["serviceAccountName"] == sa["metadata"]["name"]


# -- network --------------------------------------------------------------------------
FUNCTION_POD = {
    "torpor.managed": "true",
    "torpor.function": "hello",
    "torpor.revision": "hello-00001",
    "torpor.replica": "hello-00001-abc",
    "torpor.instance": "torpor",
}


def _peers_allow(policy: Doc, labels: dict[str, str]) -> bool:
    """Whether a Pod in the same namespace with these labels may connect (podSelector peers)."""
    for rule in policy["spec"].get("ingress") or []:
        for peer in rule.get("from") or []:
            if set(peer) == {"podSelector"} and selects(peer["podSelector"], labels):
                return True
    return False


def test_function_pods_accept_traffic_only_from_gateways(docs: list[Doc]) -> None:
    pol = one(docs, "NetworkPolicy", "torpor-functions")
    assert pol["spec"]["podSelector"] == {"matchLabels": {"torpor.managed": "true"}}
    assert selects(pol["spec"]["podSelector"], FUNCTION_POD)
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = pol["spec"]["ingress"]
    assert [set(p) for p in rule["from"]] == [{"podSelector"}]  # no namespaceSelector, no ipBlock
    labels = pods_labels(docs)
    assert _peers_allow(pol, labels["torpor-gateway"])
    for other in ("torpor-api", "torpor-controller", "torpor-redis"):
        assert not _peers_allow(pol, labels[other]), other
    assert not _peers_allow(pol, FUNCTION_POD)  # functions cannot call each other directly
    other_release = dict(labels["torpor-gateway"], **{"app.kubernetes.io/instance": "other"})
    assert not _peers_allow(pol, other_release)


def test_function_pods_can_also_admit_the_controller_when_asked(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["values-file"]
    pol = one(docs, "NetworkPolicy", "torpor-functions")
    labels = pods_labels(docs)
    assert _peers_allow(pol, labels["torpor-controller"]) and _peers_allow(
        pol, labels["torpor-gateway"]
    )
    assert not _peers_allow(pol, labels["torpor-api"])
    # ...and only then does the controller connect to function Pods (its own probes)
    assert env_of(container(docs, "controller"))["TORPOR_K8S_READINESS"]["value"] == "direct"


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_the_controller_connects_to_function_pods_only_where_the_policy_lets_it(
    rendered: dict[str, list[Doc]], value_set: str
) -> None:
    """The default works under its own NetworkPolicy: with readiness from the kubelet the
    controller needs no connection to function Pods (the driver watches their Ready
    condition through the API server; kubelet probes come from the node, which
    NetworkPolicies always admit); with direct readiness the policy must admit it."""
    docs = rendered[value_set]
    prefix = "prod-torpor" if value_set == "release-prod" else "torpor"
    readiness = env_of(container(docs, "controller", prefix))["TORPOR_K8S_READINESS"]["value"]
    assert readiness in ("kubelet", "direct")
    pols = [
        p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"] == f"{prefix}-functions"
    ]
    if readiness == "direct" and pols:
        assert _peers_allow(pols[0], pods_labels(docs)[f"{prefix}-controller"]), value_set
    if value_set == "defaults":
        assert readiness == "kubelet" and not _peers_allow(
            pols[0], pods_labels(docs)["torpor-controller"]
        )


def test_redis_accepts_only_torpor_components(docs: list[Doc]) -> None:
    pol = one(docs, "NetworkPolicy", "torpor-redis")
    labels = pods_labels(docs)
    assert selects(pol["spec"]["podSelector"], labels["torpor-redis"])
    assert not selects(pol["spec"]["podSelector"], labels["torpor-gateway"])
    for name in ("torpor-gateway", "torpor-api", "torpor-controller"):
        assert _peers_allow(pol, labels[name]), name
    assert not _peers_allow(pol, FUNCTION_POD)
    assert not _peers_allow(pol, {"app": "something-else"})
    assert [p["port"] for p in pol["spec"]["ingress"][0]["ports"]] == ["redis"]


def test_api_accepts_function_pods_and_configured_peers_only(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["defaults"]
    pol = one(docs, "NetworkPolicy", "torpor-api")
    labels = pods_labels(docs)
    assert selects(pol["spec"]["podSelector"], labels["torpor-api"])
    assert _peers_allow(pol, FUNCTION_POD)
    assert not _peers_allow(pol, {"app": "something-else"})
    assert len(pol["spec"]["ingress"][0]["from"]) == 1
    extra = one(rendered["values-file"], "NetworkPolicy", "torpor-api")["spec"]["ingress"][0][
        "from"
    ]
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}
    } in extra
    ctl = one(docs, "NetworkPolicy", "torpor-controller")
    assert ctl["spec"]["ingress"] == [] and selects(
        ctl["spec"]["podSelector"], labels["torpor-controller"]
    )


def test_network_policies_can_be_turned_off(rendered: dict[str, list[Doc]]) -> None:
    assert not of_kind(rendered["no-networkpolicy"], "NetworkPolicy")
    assert (
        run_render("--set", "networkPolicy.enabled=false", "--notes").stdout.count("WARNING") == 1
    )


# -- Redis ----------------------------------------------------------------------------
def _store_env(docs: list[Doc], prefix: str = "torpor") -> dict[str, list[Doc]]:
    return {c: container(docs, c, prefix)["env"] for c in DEPLOYMENTS}


def test_bundled_redis_is_a_persistent_appendonly_statefulset(docs: list[Doc]) -> None:
    sts = one(docs, "StatefulSet", "torpor-redis")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    (c,) = pod_spec(sts)["containers"]
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--dir") + 1] == "/data"
    assert (
        args[args.index("--maxmemory-policy") + 1] == "noeviction"
    )  # refuse writes, never drop state
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert env_of(c)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "torpor-redis",
        "key": "password",
    }
    assert re.fullmatch(
        r"[A-Za-z0-9]{40}", secret_value(one(docs, "Secret", "torpor-redis"), "password")
    )
    svc = one(docs, "Service", "torpor-redis")
    assert sts["spec"]["serviceName"] == "torpor-redis"
    assert selects(
        {"matchLabels": svc["spec"]["selector"]}, sts["spec"]["template"]["metadata"]["labels"]
    )


def test_components_reach_the_bundled_redis_with_its_password(docs: list[Doc]) -> None:
    for component, env in _store_env(docs).items():
        names = [e["name"] for e in env]
        # the password is defined before the URL that refers to it (kubelet expands in order)
        assert names.index("TORPOR_REDIS_PASSWORD") < names.index("TORPOR_REDIS"), component
        by = env_of({"env": env})
        assert (
            by["TORPOR_REDIS"]["value"] == "redis://:$(TORPOR_REDIS_PASSWORD)@torpor-redis:6379/0"
        )
        assert by["TORPOR_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "torpor-redis",
            "key": "password",
        }


def test_redis_without_persistence_or_auth(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["values-file"]
    sts = one(docs, "StatefulSet", "torpor-redis")
    assert "volumeClaimTemplates" not in sts["spec"]
    assert {"name": "data", "emptyDir": {}} in pod_spec(sts)["volumes"]
    assert not [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == "torpor-redis"]
    assert "--requirepass" not in pod_spec(sts)["containers"][0]["args"]
    for env in _store_env(docs).values():
        assert env_of({"env": env})["TORPOR_REDIS"]["value"] == "redis://torpor-redis:6379/0"


@pytest.mark.parametrize("value_set", ["external-redis", "external-redis-secret"])
def test_redis_url_renders_no_redis_at_all(rendered: dict[str, list[Doc]], value_set: str) -> None:
    docs = rendered[value_set]
    assert not of_kind(docs, "StatefulSet")
    assert not [d for d in docs if "redis" in d["metadata"]["name"]]
    assert not [
        d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "redis"
    ]
    for component, env in _store_env(docs).items():
        by = env_of({"env": env})
        assert "TORPOR_REDIS_PASSWORD" not in by, component
        if value_set == "external-redis":
            assert by["TORPOR_REDIS"] == {"name": "TORPOR_REDIS", "value": EXTERNAL}, component
        else:
            assert by["TORPOR_REDIS"]["valueFrom"]["secretKeyRef"] == {
                "name": "redis-url",
                "key": "url",
            }


# -- API token ------------------------------------------------------------------------
def test_api_token_comes_from_a_generated_secret(docs: list[Doc]) -> None:
    token = secret_value(one(docs, "Secret", "torpor-api"), "token")
    assert re.fullmatch(r"[A-Za-z0-9]{48}", token)
    env = env_of(container(docs, "api"))
    assert env["TORPOR_TOKEN"] == {
        "name": "TORPOR_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "torpor-api", "key": "token"}},
    }
    for component in ("gateway", "controller"):
        assert "TORPOR_TOKEN" not in env_of(container(docs, component))
    assert token not in yaml.safe_dump([deployment(docs, c) for c in DEPLOYMENTS])


def test_api_token_from_an_existing_secret(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["existing-secret"]
    assert not [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == "torpor-api"]
    ref = env_of(container(docs, "api"))["TORPOR_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "my-token", "key": "bearer"}
    notes = run_render(
        "--set", "api.existingSecret=my-token", "--set", "api.existingSecretKey=bearer", "--notes"
    )
    assert "get secret my-token -o jsonpath='{.data.bearer}'" in notes.stdout


def test_api_token_from_values_is_checked() -> None:
    docs = render("--set", "api.token=0123456789abcdefXYZ")
    assert secret_value(one(docs, "Secret", "torpor-api"), "token") == "0123456789abcdefXYZ"
    out = run_render("--set", "api.token=short")
    assert out.returncode != 0
    assert "api.token must be at least 16 characters" in out.stderr


# -- gateway: HPA, PDB, Ingress ---------------------------------------------------------
def test_gateway_autoscales_on_cpu_and_keeps_a_disruption_budget(docs: list[Doc]) -> None:
    gw = deployment(docs, "gateway")
    assert "replicas" not in gw["spec"]  # the HPA owns the count
    hpa = one(docs, "HorizontalPodAutoscaler", "torpor-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "torpor-gateway",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    (metric,) = hpa["spec"]["metrics"]
    assert (
        metric["resource"]["name"] == "cpu"
        and metric["resource"]["target"]["averageUtilization"] == 70
    )
    pdb = one(docs, "PodDisruptionBudget", "torpor-gateway")
    assert pdb["spec"]["minAvailable"] == 1
    labels = pods_labels(docs)
    assert selects(pdb["spec"]["selector"], labels["torpor-gateway"])
    assert not selects(pdb["spec"]["selector"], labels["torpor-api"])


def test_hpa_disabled_pins_the_replica_count(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["hpa-disabled"]
    assert not of_kind(docs, "HorizontalPodAutoscaler")
    assert deployment(docs, "gateway")["spec"]["replicas"] == 3
    out = run_render(
        "--set", "gateway.autoscaling.minReplicas=5", "--set", "gateway.autoscaling.maxReplicas=3"
    )
    assert out.returncode != 0 and "minReplicas (5) is above maxReplicas (3)" in out.stderr


def _ingress_rules(ing: Doc) -> dict[str, list[tuple[str, str, str, object]]]:
    return {
        r["host"]: [
            (
                p["path"],
                p["pathType"],
                p["backend"]["service"]["name"],
                p["backend"]["service"]["port"]["name"],
            )
            for p in r["http"]["paths"]
        ]
        for r in ing["spec"]["rules"]
    }


def test_ingress_serves_wildcard_hosts_and_the_function_path(docs: list[Doc]) -> None:
    ing = one(docs, "Ingress", "torpor-gateway")
    assert _ingress_rules(ing) == {
        "*.torpor.example.com": [("/", "Prefix", "torpor-gateway", "http")],
        "torpor.example.com": [("/function/", "Prefix", "torpor-gateway", "http")],
    }
    assert "tls" not in ing["spec"] and "ingressClassName" not in ing["spec"]
    svc = one(docs, "Service", "torpor-gateway")
    assert [p["name"] for p in svc["spec"]["ports"]] == ["http"]
    assert selects({"matchLabels": svc["spec"]["selector"]}, pods_labels(docs)["torpor-gateway"])


def test_custom_domain_reaches_the_ingress_and_every_component(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["custom-domain"]
    ing = one(docs, "Ingress", "torpor-gateway")
    assert set(_ingress_rules(ing)) == {"*.fn.acme.example", "fn.acme.example"}
    assert ing["spec"]["tls"] == [
        {"hosts": ["*.fn.acme.example", "fn.acme.example"], "secretName": "wildcard"}
    ]
    assert ing["spec"]["ingressClassName"] == "nginx"
    for c in DEPLOYMENTS:
        assert env_of(container(docs, c))["TORPOR_DOMAIN"]["value"] == "fn.acme.example"
    assert env_of(container(docs, "api"))["TORPOR_PUBLIC_URL"]["value"] == "https://fn.acme.example"


def test_ingress_disabled(rendered: dict[str, list[Doc]]) -> None:
    assert not of_kind(rendered["ingress-disabled"], "Ingress")
    assert of_kind(rendered["ingress-disabled"], "Service")


# -- labels and wiring ----------------------------------------------------------------
@pytest.mark.parametrize("value_set,release", [("defaults", "torpor"), ("release-prod", "prod")])
def test_recommended_labels_everywhere(
    rendered: dict[str, list[Doc]], value_set: str, release: str
) -> None:
    docs = rendered[value_set]
    for d in docs:
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "torpor", d["metadata"]["name"]
        assert labels["app.kubernetes.io/instance"] == release
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == APP_VERSION
    for w in workloads(docs):
        component = w["metadata"]["labels"]["app.kubernetes.io/component"]
        assert component in DEPLOYMENTS | {"redis"}
        selector = w["spec"]["selector"]["matchLabels"]
        assert selector == {
            "app.kubernetes.io/name": "torpor",
            "app.kubernetes.io/instance": release,
            "app.kubernetes.io/component": component,
        }
        assert selects(w["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("value_set", ["defaults", "release-prod"])
def test_each_service_selects_exactly_its_workload_and_ports(
    rendered: dict[str, list[Doc]], value_set: str
) -> None:
    docs = rendered[value_set]
    for svc in of_kind(docs, "Service"):
        matched = [
            w
            for w in workloads(docs)
            if selects(
                {"matchLabels": svc["spec"]["selector"]},
                w["spec"]["template"]["metadata"]["labels"],
            )
        ]
        assert len(matched) == 1, svc["metadata"]["name"]
        assert matched[0]["metadata"]["name"] == svc["metadata"]["name"]
        ports = {p["name"] for c in containers(matched[0]) for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports


def test_notes_say_how_to_reach_the_gateway_and_the_api() -> None:
    out = run_render("--notes")
    assert out.returncode == 0, out.stderr
    notes = out.stdout
    assert "kubectl -n default port-forward svc/torpor-gateway 8080:80" in notes
    assert "kubectl -n default port-forward svc/torpor-api 8081:8081" in notes
    assert "get secret torpor-api -o jsonpath='{.data.token}'" in notes
    assert (
        "http://NAME.torpor.example.com/" in notes
        and "http://torpor.example.com/function/NAME/" in notes
    )
    assert "StatefulSet torpor-redis" in notes
    external = run_render(
        "--notes", "--set", f"redis.url={EXTERNAL}", "--set", "ingress.enabled=false"
    ).stdout
    assert "External Redis" in external and "Ingress is disabled" in external


def test_values_yaml_documents_every_section() -> None:
    """Each top-level key of values.yaml has a comment just above it or inside its section."""
    text = (CHART / "values.yaml").read_text()
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^[a-zA-Z]+:", line)]
    assert len(starts) >= 15
    for n, i in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        documented = lines[i - 1].startswith("#") or any(
            x.lstrip().startswith("# ") for x in lines[i:end]
        )
        assert documented, f"values.yaml: {lines[i]} has no comment"
    assert "renders no Redis" in text

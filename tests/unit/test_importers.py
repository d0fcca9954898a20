"""Knative Service and OpenFaaS stack files -> Torpor specs (torpor.importers), on the
sample files in tests/samples (written after the Knative and OpenFaaS docs)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from torpor.importers import ImportRefused, detect, load_documents
from torpor.importers.export import to_knative, to_openfaas
from torpor.importers.knative import import_documents
from torpor.importers.openfaas import import_stack
from torpor.model import Revision, Spec
from torpor.spec import parse_spec, spec_to_yaml_dict

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
HELLO = SAMPLES / "knative" / "hello.yaml"
STACK = SAMPLES / "openfaas" / "stack.yml"


def knative(path: Path = HELLO) -> list[Any]:
    return load_documents(path)


def one_knative(doc: dict[str, Any]) -> Any:
    return import_documents([doc], "service.yaml")[0]


def hello_doc() -> dict[str, Any]:
    return copy.deepcopy(knative()[0])


def test_files_are_told_apart() -> None:
    assert detect(knative()) == "knative"
    assert detect(load_documents(STACK)) == "openfaas"
    assert detect([{"name": "hello", "handler": "handler:handle"}]) is None


def test_knative_service_maps_every_listed_field() -> None:
    imp = import_documents(knative(), "hello.yaml")[0]
    spec = imp.validate("hello.yaml")
    assert spec.name == "hello"
    assert spec.image == "torpor-test/knative-hello:1" and spec.handler is None
    assert spec.command == ["python3", "/app/serve.py"] and spec.args == ["--greeting", "Hello"]
    assert spec.port == 8081
    assert spec.env == {"TARGET": "World"}
    assert spec.secrets == {"DB_PASSWORD": "db-password"}  # Secret db, key password
    assert spec.labels == {"app": "hello", "team": "web"}
    assert spec.resources.cpu == 1.0 and spec.resources.memory == 128 * 1024 * 1024  # the limits
    assert spec.timeout == 45
    s = spec.scale
    assert (s.min, s.max, s.concurrency) == (0, 5, 50)
    assert s.target == 10  # target 20 x utilization 50 %
    assert s.window == 40 and s.panic_window == 20 and s.panic_threshold == 150
    assert s.idle == 65  # scale-to-zero-pod-retention-period 1m5s
    assert imp.traffic is None
    text = "\n".join(imp.warnings)
    for named in (
        "spec.template.spec.nodeSelector",
        "spec.template.spec.tolerations",
        "metadata.namespace",
        "containers[0].readinessProbe",
        "requests.cpu",
        "requests.memory",
    ):
        assert named in text, (named, text)
    assert "scheduling field, ignored" in text
    assert "initial-scale" not in text  # 1 is what Torpor does


def test_knative_defaults_for_the_target_follow_knative() -> None:
    doc = hello_doc()
    ann = doc["spec"]["template"]["metadata"]["annotations"]
    del (
        ann["autoscaling.knative.dev/target"],
        ann["autoscaling.knative.dev/target-utilization-percentage"],
    )
    assert one_knative(doc).validate("s").scale.target == 35  # containerConcurrency 50 x 70 %
    del doc["spec"]["template"]["spec"]["containerConcurrency"]
    assert one_knative(doc).validate("s").scale.target == 70  # 100 x 70 %
    ann["autoscaling.knative.dev/target"] = "500"
    doc["spec"]["template"]["spec"]["containerConcurrency"] = 10
    assert one_knative(doc).validate("s").scale.target == 7  # capped at the hard limit, x 70 %


@pytest.mark.parametrize(
    "mutate, where, words",
    [
        (
            lambda d: d["spec"]["template"]["metadata"]["annotations"].update(
                {"autoscaling.knative.dev/metric": "rps"}
            ),
            "autoscaling.knative.dev/metric",
            "rps is not supported",
        ),
        (
            lambda d: d["spec"]["template"]["metadata"]["annotations"].update(
                {"autoscaling.knative.dev/class": "hpa.autoscaling.knative.dev"}
            ),
            "autoscaling.knative.dev/class",
            "KPA",
        ),
        (
            lambda d: d["metadata"]["labels"].update(
                {"networking.knative.dev/visibility": "cluster-local"}
            ),
            "networking.knative.dev/visibility",
            "cluster-only",
        ),
        (
            lambda d: d["spec"]["template"]["spec"]["containers"].append({"image": "sidecar:1"}),
            "containers",
            "sidecars",
        ),
        (
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(
                {"name": "h2c"}
            ),
            "ports[0].name",
            "HTTP/1.1",
        ),
        (
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"].append(
                {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}
            ),
            "env[2].valueFrom",
            "configMapKeyRef",
        ),
        (
            lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
                {"envFrom": [{"secretRef": {"name": "s"}}]}
            ),
            "envFrom",
            "not known at deploy time",
        ),
        (
            lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
                {"volumeMounts": [{"name": "v"}]}
            ),
            "volumeMounts",
            "would be missing",
        ),
        (
            lambda d: d["spec"].update({"traffic": [{"latestRevision": True, "percent": 60}]}),
            "spec.traffic",
            "sum to 100",
        ),
        (
            lambda d: d["spec"].update(
                {"traffic": [{"configurationName": "hello", "percent": 100}]}
            ),
            "configurationName",
            "revisionName",
        ),
    ],
)
def test_knative_fields_whose_meaning_would_change_are_refused(
    mutate: Any, where: str, words: str
) -> None:
    doc = hello_doc()
    mutate(doc)
    with pytest.raises(ImportRefused) as err:
        one_knative(doc)
    assert where in str(err.value) and words in str(err.value), str(err.value)


def test_knative_values_torpor_refuses_name_the_knative_field() -> None:
    doc = hello_doc()
    doc["spec"]["template"]["spec"]["timeoutSeconds"] = 900
    with pytest.raises(ImportRefused) as err:
        one_knative(doc).validate("service.yaml")
    msg = str(err.value)
    assert msg.startswith(
        "service.yaml: hello: spec.template.spec.timeoutSeconds (as timeout): "
    ), msg
    assert "600s" in msg
    doc = hello_doc()
    doc["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/window"] = "2s"
    with pytest.raises(
        ImportRefused, match=r"annotations.autoscaling.knative.dev/window \(as scale.window\)"
    ):
        one_knative(doc).validate("service.yaml")
    doc = hello_doc()
    doc["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] = "two"
    with pytest.raises(ImportRefused, match="min-scale: expected an integer, got 'two'"):
        one_knative(doc)


def test_knative_unknown_fields_are_named_never_dropped_silently() -> None:
    doc = hello_doc()
    doc["spec"]["template"]["spec"]["serviceAccountName"] = "robot"
    doc["spec"]["template"]["spec"]["containers"][0]["workingDir"] = "/srv"
    doc["spec"]["template"]["metadata"]["annotations"][
        "autoscaling.knative.dev/activation-scale"
    ] = "2"
    doc["spec"]["template"]["metadata"]["annotations"]["example.com/owner"] = "me"
    doc["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/initial-scale"] = (
        "3"
    )
    doc["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"] = "0"
    doc["status"] = {"url": "http://hello.default.example.com"}
    text = "\n".join(one_knative(doc).warnings)
    for named in (
        "spec.template.spec.serviceAccountName",
        "containers[0].workingDir",
        "activation-scale",
        "example.com/owner",
        "initial-scale: 3",
        "max-scale: 0 (unbounded in Knative)",
        "status",
    ):
        assert named in text, (named, text)


def test_several_services_per_file_and_traffic_blocks() -> None:
    imps = import_documents(knative(SAMPLES / "knative" / "two-services.yaml"), "two.yaml")
    assert [i.name for i in imps] == ["greeter", "echo"]
    assert "skipped, not a Knative Service: document 2 ('Secret' of 'v1')" in "\n".join(
        imps[0].warnings
    )
    greeter = imps[0]
    assert [(t.revision, t.percent, t.tag) for t in greeter.traffic or []] == [
        (None, 100, None),
        ("greeter-00001", 0, "previous"),
    ]
    assert "spec.template.metadata.name" in "\n".join(greeter.warnings)
    assert imps[1].validate("two.yaml").env == {"MODE": "echo"}
    split = import_documents(knative(SAMPLES / "knative" / "split.yaml"), "split.yaml")[0]
    # revisionName == the template's name is the revision this deploy creates
    assert [(t.revision, t.percent, t.tag) for t in split.traffic or []] == [
        ("split-00001", 80, None),
        (None, 20, "blue"),
    ]


def test_a_file_without_a_knative_service_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImportRefused, match="no serving.knative.dev/v1 Service"):
        import_documents([{"apiVersion": "v1", "kind": "ConfigMap"}], "x.yaml")
    old = hello_doc()
    old["apiVersion"] = "serving.knative.dev/v1alpha1"
    with pytest.raises(ImportRefused, match="v1alpha1 is not supported"):
        import_documents([old], "x.yaml")
    with pytest.raises(ImportRefused, match="more than one Service"):
        import_documents([hello_doc(), hello_doc()], "x.yaml")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (1024 * 1024 + 1))
    with pytest.raises(ImportRefused, match="larger than 1 MiB"):
        load_documents(big)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [\n")
    with pytest.raises(ImportRefused, match="invalid YAML at line"):
        load_documents(bad)


# -- OpenFaaS -------------------------------------------------------------------------------


def stack_doc() -> dict[str, Any]:
    return copy.deepcopy(load_documents(STACK)[0])


def test_openfaas_python3_http_function_maps_every_listed_key() -> None:
    imps = import_stack(load_documents(STACK)[0], STACK)
    assert [i.name for i in imps] == ["hello-py", "resizer"]
    hello = imps[0]
    spec = hello.validate("stack.yml")
    assert spec.handler == "function.handler:handle" and spec.handler_style == "openfaas"
    assert (
        hello.source == (SAMPLES / "openfaas" / "hello-py").resolve()
        and hello.package == "function"
    )
    assert hello.requirements is not None and hello.requirements.name == "requirements.txt"
    # environment_file first, then environment on top
    assert spec.env == {
        "GREETING": "hi",
        "REGION": "eu-west",
        "write_debug": "true",
        "exec_timeout": "20s",
    }
    assert spec.timeout == 20
    assert spec.secrets == {"API_KEY": "api-key"}
    assert (spec.scale.min, spec.scale.max, spec.scale.idle) == (0, 4, 120)
    assert spec.scale.target == 5  # capacity target 10 x proportion 0.5
    assert spec.labels == {"team": "web"}
    assert spec.resources.memory == 128 * 1024 * 1024 and spec.resources.cpu == 0.5
    text = "\n".join(hello.warnings)
    for named in (
        "functions.hello-py.image",
        "annotations.topic",
        "constraints",
        "requests.memory",
        "/var/openfaas/secrets/api-key",
        "provider.gateway",
    ):
        assert named in text, (named, text)
    resizer = imps[1].validate("stack.yml")
    assert resizer.image == "torpor-test/openfaas-resizer:1" and resizer.scale.min == 0
    assert "docker build -t torpor-test/openfaas-resizer:1 ./resizer" in "\n".join(imps[1].warnings)


def test_openfaas_filter_and_defaults() -> None:
    only = import_stack(stack_doc(), STACK, only="resizer")
    assert [i.name for i in only] == ["resizer"]
    with pytest.raises(ImportRefused, match="--filter 'nope': no such function"):
        import_stack(stack_doc(), STACK, only="nope")
    doc = stack_doc()
    doc["functions"]["resizer"]["labels"] = {}
    imp = import_stack(doc, STACK, only="resizer")[0]
    assert imp.validate("stack.yml").scale.min == 1  # OpenFaaS keeps one replica unless scale.zero
    assert "com.openfaas.scale.zero is not true" in "\n".join(imp.warnings)
    doc["functions"]["resizer"]["environment"] = {"max_inflight": "4"}
    assert import_stack(doc, STACK, only="resizer")[0].validate("s").scale.concurrency == 4


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda f: f.update({"lang": "node18"}), "other templates are not supported"),
        (lambda f: f["labels"].update({"com.openfaas.scale.type": "rps"}), "rps"),
        (lambda f: f["labels"].pop("com.openfaas.scale.type"), "rps by default"),
        (lambda f: f.update({"handler": "./nowhere"}), "no handler.py"),
        (lambda f: f.update({"secrets": ["Bad_Name"]}), "secret name"),
        (lambda f: f.update({"environment_file": ["env/missing.yml"]}), "cannot read"),
    ],
)
def test_openfaas_keys_torpor_cannot_honour_are_refused(mutate: Any, words: str) -> None:
    doc = stack_doc()
    mutate(doc["functions"]["hello-py"])
    with pytest.raises(ImportRefused) as err:
        import_stack(doc, STACK)
    assert "functions.hello-py" in str(err.value) and words in str(err.value), str(err.value)


def test_openfaas_unknown_keys_are_named() -> None:
    doc = stack_doc()
    doc["functions"]["hello-py"].update({"build_args": {"ADDITIONAL_PACKAGE": "gcc"}, "fancy": 1})
    doc["registry"] = "x"
    text = "\n".join(import_stack(doc, STACK)[0].warnings)
    assert "functions.hello-py.build_args" in text and "functions.hello-py.fancy" in text
    assert "stack.yml: registry: not supported" in text


# -- going back out ---------------------------------------------------------------------------


def view(spec: Spec, image: str | None = None) -> dict[str, Any]:
    rev = Revision(name=f"{spec.name}-00002", function=spec.name, number=2, spec=spec, image=image)
    return {
        "name": spec.name,
        "revisions": [
            {"name": rev.name, "number": 2, "traffic": 100, "image": image, "spec": spec.to_dict()}
        ],
        "traffic": [{"revision": rev.name, "percent": 100, "tag": None}],
    }


def test_export_to_knative_imports_back_to_the_same_spec() -> None:
    spec = import_documents(knative(), "hello.yaml")[0].validate("hello.yaml")
    doc, warnings = to_knative(view(spec))
    assert doc["apiVersion"] == "serving.knative.dev/v1" and doc["kind"] == "Service"
    text = yaml.safe_dump(doc)
    back = import_documents(list(yaml.safe_load_all(text)), "exported.yaml")[0]
    assert back.validate("exported.yaml") == spec
    assert back.traffic == [back.traffic[0]] and back.traffic[0].revision == "hello-00002"
    assert any("Kubernetes Secret" in w for w in warnings)


def test_export_to_openfaas_imports_back_to_the_same_scaling_and_resources(tmp_path: Path) -> None:
    spec = parse_spec(
        {
            "name": "img",
            "image": "torpor-test/x:1",
            "env": {"A": "1"},
            "timeout": "20s",
            "scale": {"min": 0, "max": 7, "target": 3, "idle": "2m", "concurrency": 5},
            "resources": {"cpu": "250m", "memory": "64Mi"},
            "labels": {"team": "web"},
        }
    )
    doc, _ = to_openfaas(view(spec))
    stack = tmp_path / "stack.yml"
    stack.write_text(yaml.safe_dump(doc))
    back = import_stack(load_documents(stack)[0], stack)[0].validate("stack.yml")
    assert back.image == spec.image and back.timeout == 20 and back.labels == {"team": "web"}
    assert (
        back.scale.min,
        back.scale.max,
        back.scale.target,
        back.scale.idle,
        back.scale.concurrency,
    ) == (0, 7, 3, 120, 5)
    assert back.resources == spec.resources
    assert back.env["A"] == "1"


def test_new_spec_keys_round_trip_and_are_checked() -> None:
    spec = parse_spec(
        {
            "name": "a",
            "image": "x/y:1",
            "command": ["/bin/app"],
            "args": ["-v", 3],
            "labels": {"app.kubernetes.io/name": "a"},
            "scale": {"panic_window": 25, "panic_threshold": 300},
        }
    )
    assert spec.args == ["-v", "3"]
    assert parse_spec(spec_to_yaml_dict(spec)) == spec
    src = parse_spec(
        {"name": "b", "handler": "function.handler:handle", "handler_style": "openfaas"}
    )
    assert parse_spec(spec_to_yaml_dict(src)) == src
    from torpor.spec import SpecError

    for bad, where in (
        ({"name": "a", "handler_style": "lambda"}, "handler_style"),
        ({"name": "a", "command": ["x"]}, "command"),
        ({"name": "a", "image": "x/y:1", "handler_style": "openfaas"}, "handler_style"),
        ({"name": "a", "labels": {"torpor.function": "x"}}, "labels.'torpor.function'"),
        ({"name": "a", "labels": {"a": "b c"}}, "labels.a"),
        ({"name": "a", "scale": {"panic_threshold": 100}}, "scale.panic_threshold"),
        ({"name": "a", "scale": {"panic_window": 0}}, "scale.panic_window"),
        ({"name": "a", "env": {"K_SERVICE": "x"}}, "env.K_SERVICE"),
    ):
        with pytest.raises(SpecError) as err:
            parse_spec(bad)
        assert err.value.path == where, (bad, err.value)


@pytest.mark.security
def test_labels_cannot_claim_torpors_own(attack: Any) -> None:
    """Deploy a spec (or a Knative Service) whose labels claim torpor.function/instance/managed of other containers."""
    from torpor.drivers.kubernetes import PodSettings, pod_manifest
    from torpor.spec import SpecError

    for key in ("torpor.function", "torpor.instance", "torpor.managed", "torpor/replica"):
        with pytest.raises(SpecError, match="torpor.\\* labels are set by Torpor"):
            parse_spec({"name": "a", "labels": {key: "victim"}})
        doc = hello_doc()
        doc["metadata"]["labels"][key] = "victim"
        with pytest.raises(ImportRefused, match="torpor"):
            one_knative(doc).validate("service.yaml")
    # a record stored without the check still cannot override them on a Pod
    spec = Spec(
        name="a", image="x/y:1", labels={"torpor.instance": "victim", "torpor.function": "victim"}
    )
    rev = Revision(name="a-00001", function="a", number=1, spec=spec)
    settings = PodSettings(
        namespace="ns", instance="mine", runtime_image="r:1", archive_url_base="http://a"
    )
    labels = pod_manifest(rev, "a-00001-r1", "uid", settings).to_dict()["metadata"]["labels"]
    assert labels["torpor.instance"] == "mine" and labels["torpor.function"] == "a"
    attack.ended(
        "refused at deploy (labels.KEY: torpor.* labels are set by Torpor); Torpor's own labels win"
    )

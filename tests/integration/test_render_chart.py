"""scripts/render-chart has Helm's template semantics (whichever renderer runs: helm when
installed, else the offline Go renderer): values merging and --set typing, the built-in
objects, include/tpl/required/fail/toYaml/fromYaml/lookup, partials and NOTES.txt not
output, empty documents dropped, install-order sorting, `# Source:` headers, errors.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from chart_tools import RENDER, render, render_text, require_renderer, run_render


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text).lstrip("\n"))
    return root


BASE = {
    "Chart.yaml": """
        apiVersion: v2
        name: demo
        version: 1.2.3
        appVersion: "9.9"
        """,
    "values.yaml": """
        a:
          b: 1
          c: x
          d: {e: true}
        list: [1, 2]
        keep: k
        drop: gone
        big: 1000000
        """,
    "templates/_helpers.tpl": """
        {{- define "demo.x" -}}X-{{ .Values.a.c }}{{- end -}}
        {{- define "demo.labels" -}}
        app: {{ .Chart.Name }}
        rel: {{ .Release.Name }}
        {{- end -}}
        """,
    "templates/values.yaml": """
        apiVersion: v1
        kind: ConfigMap
        metadata:
          name: values
          labels:
            {{- include "demo.labels" . | nindent 4 }}
        data:
          values: {{ toJson .Values | quote }}
          kinds: {{ printf "%s %s %s" (kindOf .Values.a.b) (kindOf .Values.a.d.e) (kindOf .Values.keep) | quote }}
          big: {{ .Values.big | quote }}
          missing: "[{{ .Values.nope }}][{{ .Values.a.nope }}]"
        """,
    "templates/objects.yaml": """
        apiVersion: v1
        kind: ConfigMap
        metadata:
          name: objects
        data:
          release: "{{ .Release.Name }}/{{ .Release.Namespace }}/{{ .Release.Service }}/{{ .Release.IsInstall }}/{{ .Release.Revision }}"
          chart: "{{ .Chart.Name }}/{{ .Chart.Version }}/{{ .Chart.AppVersion }}"
          kube: "{{ .Capabilities.KubeVersion.Version }}/{{ .Capabilities.KubeVersion.Major }}/{{ .Capabilities.KubeVersion.Minor }}"
          apis: "{{ .Capabilities.APIVersions.Has "apps/v1" }}/{{ .Capabilities.APIVersions.Has "nope.example/v9" }}"
          template: "{{ .Template.Name }} {{ .Template.BasePath }}"
          include: {{ include "demo.x" . | quote }}
          tpl: {{ tpl "{{ .Values.keep }}-{{ include \\"demo.x\\" . }}" . | quote }}
          toYaml: {{ toYaml .Values.a | quote }}
          fromYaml: {{ (fromYaml "p: {q: 7}").p.q | quote }}
          lookup: {{ lookup "v1" "Secret" "default" "x" | len | quote }}
          semver: {{ semverCompare ">=1.25.0-0" .Capabilities.KubeVersion.Version | quote }}
        """,
    "templates/order.yaml": """
        ---
        apiVersion: apps/v1
        kind: Deployment
        metadata:
          name: d
        ---
        apiVersion: v1
        kind: Service
        metadata:
          name: s
        ---
        {{ if false }}
        apiVersion: v1
        kind: Secret
        {{ end }}
        """,
    "templates/ns.yaml": """
        apiVersion: v1
        kind: Namespace
        metadata:
          name: n
        """,
    "templates/off.yaml": """
        {{- if .Values.nothing }}
        apiVersion: v1
        kind: ConfigMap
        {{- end }}
        """,
    "templates/NOTES.txt": "notes for {{ .Release.Name }} in {{ .Release.Namespace }}\n",
}


@pytest.fixture
def chart(tmp_path: Path) -> Path:
    return write(tmp_path / "demo", BASE)


def cm(docs: list[dict], name: str) -> dict[str, str]:
    (found,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    data: dict[str, str] = found["data"]
    return data


def values_of(chart: Path, *args: str) -> dict:
    v: dict = yaml.safe_load(cm(render(*args, chart=chart), "values")["values"])
    return v


def test_output_is_helm_template_shaped(chart: Path) -> None:
    text = render_text("--release", "r1", chart=chart)
    assert text.startswith("---\n# Source: demo/templates/")
    sources = [
        line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("# Source: ")
    ]
    kinds = [d["kind"] for d in yaml.safe_load_all(text) if d]
    # install order: Namespace first, Services before Deployments; ConfigMaps by file path
    assert kinds == ["Namespace", "ConfigMap", "ConfigMap", "Service", "Deployment"]
    assert sources == [
        "demo/templates/ns.yaml",
        "demo/templates/objects.yaml",
        "demo/templates/values.yaml",
        "demo/templates/order.yaml",
        "demo/templates/order.yaml",
    ]
    assert (
        "_helpers" not in text and "notes for" not in text
    )  # partials and NOTES.txt are not output
    assert "<no value>" not in text
    assert len(text.split("---\n")) == 6  # empty documents and the empty file are dropped


def test_builtin_objects_and_helm_functions(chart: Path) -> None:
    data = cm(render("--release", "r1", "--namespace", "ns1", chart=chart), "objects")
    assert data["release"] == "r1/ns1/Helm/true/1"
    assert data["chart"] == "demo/1.2.3/9.9"
    assert data["kube"] == "v1.30.0/1/30"
    assert data["apis"] == "true/false"
    assert data["template"] == "demo/templates/objects.yaml demo/templates"
    assert data["include"] == "X-x"
    assert data["tpl"] == "k-X-x"
    assert yaml.safe_load(data["toYaml"]) == {"b": 1, "c": "x", "d": {"e": True}}
    assert data["fromYaml"] == "7"
    assert data["lookup"] == "0"  # no cluster: lookup finds nothing
    assert data["semver"] == "true"


def test_values_files_merge_and_yaml_numbers_are_floats(chart: Path, tmp_path: Path) -> None:
    f1 = tmp_path / "one.yaml"
    f1.write_text("a: {c: y, d: {f: 1}}\nlist: [3]\n")
    f2 = tmp_path / "two.yaml"
    f2.write_text("a: {c: z}\ndrop: null\n")
    v = values_of(chart, "-f", str(f1), "-f", str(f2))
    assert v["a"] == {"b": 1, "c": "z", "d": {"e": True, "f": 1}}  # maps merge, later files win
    assert v["list"] == [3]  # lists replace
    assert "drop" not in v and v["keep"] == "k"  # null deletes a default
    data = cm(render(chart=chart), "values")
    assert data["kinds"] == "float64 bool string"  # as sigs.k8s.io/yaml decodes them
    assert data["big"] == "1e+06"  # Helm's well-known float formatting
    assert data["missing"] == "[][]"


def test_set_follows_helm_type_inference(chart: Path) -> None:
    v = values_of(
        chart,
        "--set",
        "a.b=2,a.new=true,s=007,f=1.5,n=null,z=0,neg=-3,txt=hello world",
        "--set",
        "list[1]=9",
        "--set",
        "drop=null",
        "--set",
        "l2={x,2,false}",
        "--set-string",
        "str=5",
        "--set",
        r"esc=a\,b",
        "--set",
        r"dotted\.key=1",
    )
    assert v["a"]["b"] == 2 and v["a"]["new"] is True and v["a"]["c"] == "x"
    assert v["s"] == "007" and v["f"] == "1.5" and v["z"] == 0 and v["neg"] == -3
    assert v["txt"] == "hello world"
    assert v["list"] == [None, 9]  # as Helm does: --set lists do not merge with the chart's list
    assert "drop" not in v
    assert v["l2"] == ["x", 2, False]
    assert v["str"] == "5"
    assert v["esc"] == "a,b"
    assert v["dotted.key"] == 1
    kinds = cm(render("--set", "a.b=2", chart=chart), "values")["kinds"]
    assert kinds.startswith("int64 ")  # --set integers are int64, file numbers float64


def test_set_later_wins_over_files(chart: Path, tmp_path: Path) -> None:
    f = tmp_path / "v.yaml"
    f.write_text("keep: from-file\n")
    assert values_of(chart, "--set", "keep=from-set", "-f", str(f))["keep"] == "from-set"


def test_notes_render_on_request(chart: Path) -> None:
    out = run_render("--notes", "--release", "r2", "--namespace", "ns2", chart=chart)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "notes for r2 in ns2"


@pytest.mark.parametrize(
    "template,message",
    [
        ('{{ required "need .Values.must" .Values.must }}', "need .Values.must"),
        ('{{ fail "broken on purpose" }}', "broken on purpose"),
        ("{{ .Values.a.b | badFunction }}", "badFunction"),
        ('{{ env "HOME" }}', "env"),
        (
            "{{ .Values.nothing.here }}",
            "nil pointer evaluating interface {}.here",
        ),  # as in Helm  # Helm removes sprig's env and expandenv
        ("kind: [unclosed", "YAML parse error on demo/templates/bad.yaml"),
    ],
)
def test_errors_fail_the_render_with_the_reason(chart: Path, template: str, message: str) -> None:
    require_renderer()
    (chart / "templates" / "bad.yaml").write_text(template + "\n")
    out = run_render(chart=chart)
    assert out.returncode != 0
    assert message in out.stderr
    assert out.stdout == ""


def test_kube_version_constraint_is_checked(chart: Path) -> None:
    require_renderer()
    meta = chart / "Chart.yaml"
    meta.write_text(meta.read_text() + 'kubeVersion: ">=1.31.0-0"\n')
    out = run_render(chart=chart)
    assert out.returncode != 0 and "incompatible with Kubernetes v1.30.0" in out.stderr
    assert run_render("--kube-version", "1.31.2", chart=chart).returncode == 0


def test_bad_arguments_are_refused(chart: Path) -> None:
    require_renderer()
    for args in (["--bogus"], ["--set"], [str(chart)]):
        out = run_render(*args, chart=chart)
        assert out.returncode != 0 and out.stderr
    out = subprocess_run([str(RENDER), str(chart.parent / "nowhere")])
    assert out.returncode != 0 and "no Chart.yaml" in out.stderr


def subprocess_run(
    argv: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)


def test_without_helm_or_go_the_wrapper_says_what_to_install(chart: Path, tmp_path: Path) -> None:
    """A machine with neither gets an install hint, not a silent skip or a stack trace."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "dirname", "sha256sum", "cut", "mkdir", "sed", "mv", "rm"):
        found = shutil.which(tool)
        assert found, tool
        (bindir / tool).symlink_to(found)
    env = {"PATH": str(bindir), "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = subprocess_run([shutil.which("bash") or "bash", str(RENDER), str(chart)], env=env)
    assert out.returncode == 2
    assert "neither helm nor go" in out.stderr and "golang-go" in out.stderr


@pytest.mark.skipif(shutil.which("go") is None, reason="exercises the Go renderer build")
def test_the_go_renderer_is_built_once_into_the_cache(chart: Path, tmp_path: Path) -> None:
    env = dict(os.environ, TORPOR_RENDERER="go", XDG_CACHE_HOME=str(tmp_path / "cache"))
    first = subprocess_run([str(RENDER), str(chart)], env=env)
    assert first.returncode == 0, first.stderr
    built = list((tmp_path / "cache" / "torpor" / "render-chart").glob("render-chart-*"))
    assert len(built) == 1 and os.access(built[0], os.X_OK)
    mtime = built[0].stat().st_mtime_ns
    second = subprocess_run([str(RENDER), str(chart)], env=env)
    assert second.stdout == first.stdout
    assert built[0].stat().st_mtime_ns == mtime


def test_helm_is_preferred_when_installed(chart: Path, tmp_path: Path) -> None:
    """With helm on PATH the wrapper hands everything to `helm template` (a recording stand-in here)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "helm"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    env.pop("TORPOR_RENDERER", None)
    out = subprocess_run(
        [
            str(RENDER),
            str(chart),
            "--set",
            "a.b=2",
            "-f",
            "v.yaml",
            "--release",
            "r",
            "--namespace",
            "ns",
            "--set-string",
            "s=1",
        ],
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "template",
        "r",
        str(chart),
        "--namespace",
        "ns",
        "--kube-version",
        "1.30.0",
        "--set",
        "a.b=2",
        "-f",
        "v.yaml",
        "--set-string",
        "s=1",
    ]


def test_shell_scripts_parse_and_pass_shellcheck() -> None:
    root = RENDER.parent
    scripts = [root / "render-chart", root / "cluster-smoke.sh", root / "test.sh"]
    for script in scripts:
        out = subprocess_run(["bash", "-n", str(script)])
        assert out.returncode == 0, f"{script.name}: {out.stderr}"
    head = (root / "cluster-smoke.sh").read_text().split("\nset -euo", 1)[0]
    assert "NOT RUN IN CI" in head
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (scripts/test.sh installs it)")
    out = subprocess_run(["shellcheck", *map(str, scripts)])
    assert out.returncode == 0, out.stdout

#!/usr/bin/env bash
# Smoke test of cluster mode against a REAL Kubernetes cluster (kind, k3d, a cloud one).
#
# NOT RUN IN CI: no cluster can run on the CI machines. CI renders the chart and validates
# it offline instead (tests/integration/test_chart.py). Run this by hand:
#
#   KUBECONFIG=~/.kube/config TORPOR_IMAGE=reg.example/torpor:0.1.0 \
#   TORPOR_RUNTIME_IMAGE=reg.example/torpor-runtime:0.1.0 bash scripts/cluster-smoke.sh
#
# It installs charts/torpor with helm into its own namespace, waits for the rollout,
# port-forwards the gateway and the API, deploys functions/hello with the torpor CLI
# (TORPOR_API + the token from the chart's Secret), waits for it to scale to zero and
# wakes it, sends a burst (hey when installed, else a Python loop) expecting no errors,
# runs a canary rollout (`torpor deploy --canary 20`, watched to promotion), and uninstalls
# (`torpor delete`, `helm uninstall`, then checks that no function Pod is left).
#
# Settings (environment):
#   TORPOR_IMAGE          platform image REPO:TAG (default torpor/torpor:<chart appVersion>)
#   TORPOR_RUNTIME_IMAGE  function runtime image REPO:TAG (default torpor/runtime:<appVersion>)
#   NAMESPACE             namespace to create and delete (default torpor-smoke)
#   RELEASE               release name (default torpor)
#   DOMAIN                functions' domain (default torpor.smoke.test; no DNS needed)
#   HELM_EXTRA            extra helm arguments, word-split (e.g. "--set redis.persistence.enabled=false")
#   KEEP=1                leave the release and namespace installed at the end
#   TIMEOUT               seconds for each wait (default 300)
# Needs: kubectl, helm, curl, python3, and the torpor CLI (pip install -e .) on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

NAMESPACE=${NAMESPACE:-torpor-smoke}
RELEASE=${RELEASE:-torpor}
DOMAIN=${DOMAIN:-torpor.smoke.test}
TIMEOUT=${TIMEOUT:-300}
KEEP=${KEEP:-0}
CHART=charts/torpor
APP_VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$CHART/Chart.yaml")
TORPOR_IMAGE=${TORPOR_IMAGE:-torpor/torpor:$APP_VERSION}
TORPOR_RUNTIME_IMAGE=${TORPOR_RUNTIME_IMAGE:-torpor/runtime:$APP_VERSION}

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'cluster-smoke: FAILED: %s\n' "$*" >&2; exit 1; }

for tool in kubectl helm curl python3 torpor; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not on PATH"
done
[ -n "${KUBECONFIG:-}" ] || [ -f "$HOME/.kube/config" ] || die "set KUBECONFIG to the cluster to test"
kubectl version >/dev/null 2>&1 || die "kubectl cannot reach the cluster (KUBECONFIG=${KUBECONFIG:-~/.kube/config})"

# the chart names everything RELEASE-torpor, or RELEASE when it already contains "torpor"
case "$RELEASE" in *torpor*) FULLNAME=$RELEASE ;; *) FULLNAME=$RELEASE-torpor ;; esac

pids=()
workdir=$(mktemp -d)
uninstalled=0
stop_background() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    pids=()
}
cleanup() {
    local rc=$?
    stop_background
    if [ "$KEEP" != 1 ] && [ "$uninstalled" != 1 ]; then
        say "uninstall (after a failure)"
        helm uninstall "$RELEASE" --namespace "$NAMESPACE" --wait >/dev/null 2>&1 || true
        # function Pods belong to the controller's per-revision ConfigMaps, not to the release
        kubectl -n "$NAMESPACE" delete configmaps,pods -l "torpor.managed=true" --wait=false >/dev/null 2>&1 || true
        kubectl delete namespace "$NAMESPACE" --wait=false >/dev/null 2>&1 || true
    fi
    rm -rf "$workdir"
    [ "$rc" = 0 ] && printf '\ncluster-smoke: OK\n' >&2
    exit "$rc"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds
wait_for() {
    local limit=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${limit}s waiting for $what"
        sleep 1
    done
}

say "helm install $RELEASE into namespace $NAMESPACE ($TORPOR_IMAGE, runtime $TORPOR_RUNTIME_IMAGE)"
# shellcheck disable=SC2086  # HELM_EXTRA is word-split on purpose
helm install "$RELEASE" "$CHART" --namespace "$NAMESPACE" --create-namespace \
    --set "image.repository=${TORPOR_IMAGE%:*}" --set "image.tag=${TORPOR_IMAGE##*:}" \
    --set "runtime.image.repository=${TORPOR_RUNTIME_IMAGE%:*}" --set "runtime.image.tag=${TORPOR_RUNTIME_IMAGE##*:}" \
    --set "domain=$DOMAIN" ${HELM_EXTRA:-}

say "wait for the rollout"
for d in gateway api controller; do
    kubectl -n "$NAMESPACE" rollout status "deployment/$FULLNAME-$d" --timeout "${TIMEOUT}s"
done
if kubectl -n "$NAMESPACE" get "statefulset/$FULLNAME-redis" >/dev/null 2>&1; then
    kubectl -n "$NAMESPACE" rollout status "statefulset/$FULLNAME-redis" --timeout "${TIMEOUT}s"
fi

say "port-forward the gateway and the API"
GW_PORT=$(free_port)
API_PORT=$(free_port)
kubectl -n "$NAMESPACE" port-forward "svc/$FULLNAME-gateway" "$GW_PORT:80" >"$workdir/pf-gw.log" 2>&1 &
pids+=("$!")
kubectl -n "$NAMESPACE" port-forward "svc/$FULLNAME-api" "$API_PORT:8081" >"$workdir/pf-api.log" 2>&1 &
pids+=("$!")
wait_for 30 "the gateway port-forward" curl -fsS "http://127.0.0.1:$GW_PORT/healthz"
wait_for 30 "the API port-forward" curl -fsS "http://127.0.0.1:$API_PORT/readyz"

export TORPOR_API=http://127.0.0.1:$API_PORT
export TORPOR_GATEWAY=http://127.0.0.1:$GW_PORT
export TORPOR_DOMAIN=$DOMAIN
TORPOR_TOKEN=$(kubectl -n "$NAMESPACE" get secret "$FULLNAME-api" -o jsonpath='{.data.token}' | base64 -d)
export TORPOR_TOKEN
HOST="hello.$DOMAIN"

say "deploy functions/hello"
torpor deploy functions/hello
curl -fsS -H "Host: $HOST" "$TORPOR_GATEWAY/?name=cluster" | grep -q "hello, cluster" || die "hello did not answer"
curl -fsS "$TORPOR_GATEWAY/function/hello/?name=path" | grep -q "hello, path" || die "the /function/ path form did not answer"

replicas() { torpor describe hello --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["replicas"]))'; }
at_zero() { [ "$(replicas)" = 0 ]; }

say "wait for hello to scale to zero (idle 30 s), then wake it"
wait_for "$TIMEOUT" "hello to scale to zero" at_zero
start=$(date +%s%N)
curl -fsS -H "Host: $HOST" "$TORPOR_GATEWAY/?name=wake" | grep -q "hello, wake" || die "no answer from zero"
echo "woke from zero in $(( ($(date +%s%N) - start) / 1000000 )) ms (port-forward included)" >&2

say "burst: 50 concurrent clients for 15 s"
if command -v hey >/dev/null 2>&1; then
    hey -z 15s -c 50 -host "$HOST" "$TORPOR_GATEWAY/" | tee "$workdir/hey.txt"
    if grep -E '^\s+\[[0-9]+\]' "$workdir/hey.txt" | grep -vq '^\s*\[200\]'; then
        die "the burst saw non-200 answers"
    fi
else
    python3 - "$TORPOR_GATEWAY" "$HOST" <<'EOF'
import concurrent.futures, sys, time, urllib.request
url, host = sys.argv[1] + "/", sys.argv[2]
def client(_):
    ok = bad = 0
    end = time.monotonic() + 15
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers={"Host": host}), timeout=30) as r:
                ok += r.status == 200
                bad += r.status != 200
        except Exception:
            bad += 1
    return ok, bad
with concurrent.futures.ThreadPoolExecutor(50) as pool:
    results = list(pool.map(client, range(50)))
ok, bad = sum(r[0] for r in results), sum(r[1] for r in results)
print(f"burst: {ok} ok, {bad} errors", file=sys.stderr)
sys.exit(1 if bad or not ok else 0)
EOF
fi
echo "replicas after the burst: $(replicas)" >&2

say "canary: a new revision at 20%, judged and promoted"
cp -r functions/hello "$workdir/hello"
sed -i 's/GREETING: hello/GREETING: howdy/' "$workdir/hello/torpor.yaml"
printf 'rollout: {steps: [20, 100], interval: 15s, min_requests: 20}\n' >>"$workdir/hello/torpor.yaml"
(
    end=$((SECONDS + TIMEOUT))
    while [ "$SECONDS" -lt "$end" ]; do
        curl -sS -o /dev/null -H "Host: $HOST" "$TORPOR_GATEWAY/" || true
    done
) &
pids+=("$!")
torpor deploy "$workdir/hello" --canary 20 || die "the canary rollout did not promote"
curl -fsS -H "Host: $HOST" "$TORPOR_GATEWAY/?name=after" | grep -q "howdy, after" || die "the new revision does not serve"
torpor describe hello >&2

if [ "$KEEP" != 1 ]; then
    say "uninstall"
    torpor delete hello
    stop_background  # the traffic loop and the port-forwards
    helm uninstall "$RELEASE" --namespace "$NAMESPACE" --wait
    # what the controller left (none after `torpor delete`; a crashed run may leave some):
    # deleting the per-revision ConfigMaps makes the garbage collector delete their Pods
    kubectl -n "$NAMESPACE" delete configmaps -l "torpor.managed=true" --wait=true
    no_function_pods() { [ -z "$(kubectl -n "$NAMESPACE" get pods -l torpor.managed=true -o name)" ]; }
    wait_for "$TIMEOUT" "function Pods to be garbage-collected" no_function_pods
    kubectl delete namespace "$NAMESPACE" --wait=false
    uninstalled=1
fi

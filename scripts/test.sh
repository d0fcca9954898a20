#!/usr/bin/env bash
# Install what the tests need (idempotent), then run the whole test suite.
#   redis-server (real Redis for the store contract and distributed-mode tests),
#   Docker Engine + the locally built base image (docker driver tests),
#   nginx + wrk (benchmarks), Go with sprig and sigs.k8s.io/yaml (the offline chart
#   renderer behind scripts/render-chart when helm is absent), shellcheck (script
#   lint), chromium (the dashboard's browser tests, driven by Playwright), the project
#   itself with its test extras.
# Then the static gates (ruff check, ruff format --check, mypy platform gateway tests);
# any finding fails the run before pytest starts.
# Runs as root on Debian/Ubuntu; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v go >/dev/null 2>&1 || need+=(golang-go)
[ -d /usr/share/gocode/src/github.com/Masterminds/sprig ] || need+=(golang-github-masterminds-sprig-dev)
[ -d /usr/share/gocode/src/sigs.k8s.io/yaml ] || need+=(golang-k8s-sigs-yaml-dev)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ "${#need[@]}" -gt 0 ]; then
    echo "test.sh: apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

"$PYTHON" -m pip install -q --disable-pip-version-check -e '.[test]'

# The static gates, before any test: silent when clean; otherwise their findings and
# which gate stopped the run, and no tests.
gate() {
    local out
    if ! out=$("$PYTHON" -m "$@" 2>&1); then
        printf '%s\n' "$out" >&2
        echo "test.sh: FAILED gate: python -m $* (fix it, then run again; no tests were run)" >&2
        exit 1
    fi
}
gate ruff check --quiet .
gate ruff format --check --quiet .
gate mypy platform gateway tests

PYTHON="$PYTHON" bash .ci/install-docker.sh

exec "$PYTHON" -m pytest -q -p no:cacheprovider "$@"

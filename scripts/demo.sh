#!/usr/bin/env bash
# Install Torpor, run the platform in the foreground and deploy the demo function.
#   bash scripts/demo.sh            # process driver unless a Docker Engine answers
#   TORPOR_DRIVER=process bash scripts/demo.sh
# Ctrl-C stops the platform (in-flight requests drain first).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
"$PYTHON" -m pip install -q --disable-pip-version-check -e .
PORT="${TORPOR_PORT:-8080}"
API_PORT="${TORPOR_API_PORT:-8081}"
export TORPOR_API="http://127.0.0.1:$API_PORT" TORPOR_GATEWAY="http://127.0.0.1:$PORT"

torpor up --driver "${TORPOR_DRIVER:-auto}" --port "$PORT" --api-port "$API_PORT" &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP' INT TERM
for _ in $(seq 1 100); do
    curl -fsS "$TORPOR_API/readyz" >/dev/null 2>&1 && break
    kill -0 "$UP" 2>/dev/null || { echo "demo: torpor up exited" >&2; exit 1; }
    sleep 0.1
done
torpor deploy functions/hello
torpor deploy functions/echo
echo
echo "demo: $(torpor invoke hello --path '/?name=newcomer')"
cat <<TXT
demo: the platform runs in the foreground (Ctrl-C stops it). Try, from another terminal:
  curl -H 'Host: hello.torpor.localhost' 'http://127.0.0.1:$PORT/?name=you'
  curl 'http://127.0.0.1:$PORT/function/echo/anything?x=1' -d 'some body'
  TORPOR_API=$TORPOR_API torpor describe hello
TXT
wait $UP

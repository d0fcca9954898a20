#!/usr/bin/env bash
# Make a Docker Engine answer on this machine and build Torpor's base image.
# Idempotent; run as root by CI on a clean Debian/Ubuntu machine:
#   1. if `docker info` fails: apt-get install docker.io (+ debootstrap), start dockerd
#      in the background (log: /var/log/dockerd.log, storage driver overlay2) and wait
#      until it answers (bounded);
#   2. if the base image (TORPOR_BASE_IMAGE, default torpor/python-base:bookworm) is
#      missing: build it locally (debootstrap + docker import; no registry needed).
# Exits non-zero with a one-line reason on failure.
set -euo pipefail

BASE_IMAGE="${TORPOR_BASE_IMAGE:-torpor/python-base:bookworm}"
STORAGE_DRIVER="${TORPOR_DOCKER_STORAGE_DRIVER:-overlay2}"
DOCKERD_LOG="${TORPOR_DOCKERD_LOG:-/var/log/dockerd.log}"
WAIT_SECONDS="${TORPOR_DOCKER_WAIT:-60}"
PYTHON="${PYTHON:-$(command -v python || command -v python3 || true)}"

say() { echo "install-docker: $*"; }
die() { echo "install-docker: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (installs packages and starts dockerd)"

apt_install() {
    say "apt-get install -y $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
        || die "apt-get install $* failed"
}

engine_up() { docker info >/dev/null 2>&1; }

if engine_up; then
    say "Docker Engine already answers"
else
    missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v docker >/dev/null 2>&1 || missing+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    if [ "${#missing[@]}" -gt 0 ]; then
        # shellcheck disable=SC2207
        missing=($(printf '%s\n' "${missing[@]}" | sort -u))
        apt_install "${missing[@]}"
    fi
    if pgrep -x dockerd >/dev/null 2>&1; then
        say "dockerd is already starting; waiting for it"
    elif [ -d /run/systemd/system ] && systemctl start docker >/dev/null 2>&1; then
        say "started docker.service"
    else
        say "starting dockerd (storage driver $STORAGE_DRIVER, log $DOCKERD_LOG)"
        mkdir -p "$(dirname "$DOCKERD_LOG")"
        setsid nohup dockerd --storage-driver="$STORAGE_DRIVER" >>"$DOCKERD_LOG" 2>&1 </dev/null &
    fi
    for _ in $(seq 1 "$((WAIT_SECONDS * 2))"); do
        engine_up && break
        if ! pgrep -x dockerd >/dev/null 2>&1 && ! { [ -d /run/systemd/system ] && systemctl is-active --quiet docker; }; then
            tail -n 20 "$DOCKERD_LOG" >&2 2>/dev/null || true
            die "dockerd exited (log above, $DOCKERD_LOG)"
        fi
        sleep 0.5
    done
    if ! engine_up; then
        tail -n 20 "$DOCKERD_LOG" >&2 2>/dev/null || true
        die "Docker Engine did not answer within ${WAIT_SECONDS}s (log: $DOCKERD_LOG)"
    fi
    say "Docker Engine answers ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
fi

if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "base image $BASE_IMAGE present"
    exit 0
fi

if [ "$BASE_IMAGE" != "torpor/python-base:bookworm" ]; then
    say "base image $BASE_IMAGE missing: pulling it"
    docker pull "$BASE_IMAGE" || die "cannot pull $BASE_IMAGE (no registry?); unset TORPOR_BASE_IMAGE to build torpor/python-base:bookworm locally"
    exit 0
fi

command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
[ -n "$PYTHON" ] || die "no python found to build the base image (set PYTHON=...)"
"$PYTHON" -c 'import torpor.drivers.baseimage' 2>/dev/null \
    || die "$PYTHON cannot import torpor (pip install -e . first)"
say "building base image $BASE_IMAGE (debootstrap bookworm + python3, about a minute)"
"$PYTHON" -m torpor.drivers.baseimage --name "$BASE_IMAGE" \
    || die "building the base image $BASE_IMAGE failed"
docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || die "base image $BASE_IMAGE still missing after the build"
say "base image $BASE_IMAGE built"

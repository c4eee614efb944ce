#!/usr/bin/env bash
# Set-up and entry points for matrix-spoa on Debian or Ubuntu.
#
#   ./dev.sh run     HAProxy, the agent and demo workers on this machine, a burst
#                    of Matrix traffic, then up until Ctrl-C (spoa demo)
#   ./dev.sh test    lint, type-check and run every test (installs what it needs)
#   ./dev.sh bench   run the benchmarks
#
# Installs what is missing from the distribution (HAProxy; Chromium for the
# tests), as root or with sudo, and the Python dependencies into .venv.
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY="$VENV/bin/python"

say() { printf '%s\n' "dev.sh: $*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else say "need root to run: $*"; return 1
    fi
}

APT_UPDATED=0
apt_install() {
    if ! command -v apt-get >/dev/null; then
        say "missing: $*; this is not a Debian or Ubuntu system, install them by hand"
        return 1
    fi
    if [ "$APT_UPDATED" = 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_haproxy() {
    if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then
        say "installing HAProxy from the distribution"
        apt_install haproxy || { say "could not install haproxy"; exit 1; }
    fi
    # The distribution's service is not ours: never leave it holding ports.
    if command -v systemctl >/dev/null && systemctl is-active --quiet haproxy 2>/dev/null; then
        as_root systemctl stop haproxy || true
    fi
}

# The end-to-end suite runs a real Synapse: PostgreSQL and Redis from the
# distribution, Synapse from PyPI in its own virtual environment.
SYNAPSE_VENV=.venv-synapse
SYNAPSE_VERSION=1.163.2

ensure_synapse() {
    local need=()
    [ -n "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" ] || command -v initdb >/dev/null \
        || need+=(postgresql)
    command -v redis-server >/dev/null || need+=(redis-server)
    command -v psql >/dev/null || need+=(postgresql-client)
    # psycopg2 is built from source: a compiler, libpq and the Python headers.
    command -v gcc >/dev/null || need+=(gcc)
    command -v pg_config >/dev/null || need+=(libpq-dev)
    python3 -c 'import os, sysconfig, sys
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || need+=(python3-dev)
    if [ ${#need[@]} -gt 0 ]; then
        say "installing ${need[*]} from the distribution (for the end-to-end tests)"
        apt_install "${need[@]}" || { say "could not install ${need[*]}"; exit 1; }
    fi
    # The distribution's services are not ours: the tests start their own.
    if command -v systemctl >/dev/null; then
        for unit in redis-server postgresql; do
            systemctl is-active --quiet "$unit" 2>/dev/null && as_root systemctl stop "$unit" || true
        done
    fi
    if ! "$SYNAPSE_VENV/bin/python" -c "import synapse, sys
sys.exit(synapse.__version__.split()[0] != '$SYNAPSE_VERSION')" 2>/dev/null; then
        say "installing Synapse $SYNAPSE_VERSION into $SYNAPSE_VENV"
        rm -rf "$SYNAPSE_VENV"
        python3 -m venv "$SYNAPSE_VENV"
        if ! { "$SYNAPSE_VENV/bin/python" -m pip install -q --disable-pip-version-check \
                   --upgrade pip &&
               "$SYNAPSE_VENV/bin/python" -m pip install -q --disable-pip-version-check \
                   "matrix-synapse[postgres,redis]==$SYNAPSE_VERSION"; } \
                > "$SYNAPSE_VENV.log" 2>&1; then
            cat "$SYNAPSE_VENV.log" >&2
            say "installing Synapse failed (log above)"
            exit 1
        fi
    fi
}

ensure_chromium() {
    if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
        say "installing Chromium from the distribution (for the status page test)"
        apt_install chromium || { say "could not install chromium"; exit 1; }
    fi
}

ensure_venv() {
    if ! python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
        say "Python 3.11 or newer is required (python3 is $(python3 --version 2>&1))"
        exit 1
    fi
    if [ ! -x "$PY" ]; then
        if ! python3 -m venv "$VENV" 2>/dev/null; then
            rm -rf "$VENV"
            say "installing python3-venv"
            apt_install python3-venv
            python3 -m venv "$VENV"
        fi
    fi
    local stamp="$VENV/.installed" want
    # Reinstall when the dependencies or the C speedup change.
    want=$(cat pyproject.toml setup.py spoa/spop/_speedups.c | sha256sum | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        say "installing Python dependencies into $VENV"
        if ! { "$PY" -m pip install -q --disable-pip-version-check --upgrade pip &&
               "$PY" -m pip install -q --disable-pip-version-check -e '.[dev]'; } \
                > "$VENV/pip.log" 2>&1; then
            cat "$VENV/pip.log" >&2
            say "pip install failed (log above and in $VENV/pip.log)"
            exit 1
        fi
        echo "$want" > "$stamp"
    fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
    run)
        ensure_haproxy
        ensure_venv
        exec "$VENV/bin/spoa" demo "$@"
        ;;
    test)
        ensure_haproxy
        ensure_chromium
        ensure_synapse
        ensure_venv
        say "ruff"
        "$VENV/bin/ruff" check spoa tests bench setup.py
        "$VENV/bin/ruff" format --check spoa tests bench setup.py
        say "mypy (strict)"
        "$VENV/bin/mypy"
        say "pytest"
        exec "$PY" -m pytest "$@"
        ;;
    bench)
        ensure_venv
        "$PY" bench/spop_load.py "$@"
        "$PY" bench/spop_load.py --rate 75000 "$@"
        "$PY" bench/spop_load.py --policy policies/synapse-workers.yaml "$@"
        "$PY" bench/spop_load.py --policy policies/synapse-workers.yaml --whoami "$@"
        "$PY" bench/decide.py
        "$PY" bench/handler.py
        "$PY" bench/codec.py
        ;;
    *)
        sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
        [ "$cmd" = help ] || exit 2
        ;;
esac

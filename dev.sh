#!/usr/bin/env bash
# Set-up and entry points for matrix-spoa on Debian or Ubuntu.
#
#   ./dev.sh run     HAProxy, the agent and demo workers on this machine, a burst
#                    of Matrix traffic, then up until Ctrl-C (spoa demo)
#   ./dev.sh test    lint, type-check and run every test (installs what it needs)
#   ./dev.sh bench   run the benchmarks
#   ./dev.sh haproxy VERSION   build HAProxy 3.x from ../shared/haproxy-src (cached)
#   ./dev.sh compose-images    podman and the images to run docker-compose.yml here
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
}

# HAProxy 3.x, built from the upstream sources next to this checkout
# (../shared/haproxy-src; for a clone of a local checkout made elsewhere, the
# one next to that checkout; or $SPOA_HAPROXY_SRC) into a cache outside the
# repository, keyed by the tarball's checksum and the build options; a fresh
# machine builds it (about a minute each on 2 cores).
haproxy_src() {
    local beside origin
    beside="$(cd .. && pwd)/shared/haproxy-src"
    origin=$(git config --get remote.origin.url 2>/dev/null || true)
    if [ ! -d "$beside" ] && [ -d "$origin/../shared/haproxy-src" ]; then
        beside=$(cd "$origin/../shared/haproxy-src" && pwd)
    fi
    printf '%s\n' "$beside"
}
HAPROXY_SRC=${SPOA_HAPROXY_SRC:-$(haproxy_src)}
HAPROXY_CACHE=${SPOA_HAPROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/matrix-spoa/haproxy}
HAPROXY_OPTIONS="TARGET=linux-glibc USE_LUA=1 LUA_INC=/usr/include/lua5.4 LUA_LIB_NAME=lua5.4 USE_PCRE2=1 USE_PCRE2_JIT=1 USE_OPENSSL=1 USE_PROMEX=1"

# The path of a built HAProxy VERSION (3.0.11, 3.2.0, 3.4.0), building it if needed.
haproxy_build() {
    local version=$1 tarball sum key dir
    tarball="$HAPROXY_SRC/haproxy-$version.tar.gz"
    [ -f "$tarball" ] || { say "no $tarball (SPOA_HAPROXY_SRC names the directory of the HAProxy tarballs)"; return 1; }
    sum=$(sha256sum "$tarball" | cut -d' ' -f1)
    if [ -f "$HAPROXY_SRC/SHA256SUMS" ] && ! grep -q "^$sum  haproxy-$version.tar.gz$" "$HAPROXY_SRC/SHA256SUMS"; then
        say "$tarball does not match $HAPROXY_SRC/SHA256SUMS"
        return 1
    fi
    key=$(printf '%s %s' "$sum" "$HAPROXY_OPTIONS" | sha256sum | cut -c1-16)
    dir="$HAPROXY_CACHE/$version-$key"
    if [ ! -x "$dir/haproxy" ]; then
        local need=()
        command -v make >/dev/null && command -v gcc >/dev/null || need+=(build-essential)
        [ -e /usr/include/pcre2.h ] || need+=(libpcre2-dev)
        [ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
        [ -e /usr/include/lua5.4/lua.h ] || need+=(liblua5.4-dev)
        if [ ${#need[@]} -gt 0 ]; then
            say "installing ${need[*]} (to build HAProxy $version)"
            apt_install "${need[@]}" || return 1
        fi
        say "building HAProxy $version into $dir"
        local work
        work=$(mktemp -d)
        tar xzf "$tarball" -C "$work"
        # shellcheck disable=SC2086
        if ! make -C "$work/haproxy-$version" -j"$(nproc)" $HAPROXY_OPTIONS > "$work/build.log" 2>&1; then
            tail -30 "$work/build.log" >&2
            say "building HAProxy $version failed"
            return 1
        fi
        mkdir -p "$dir"
        cp "$work/haproxy-$version/haproxy" "$dir/haproxy.new" && mv "$dir/haproxy.new" "$dir/haproxy"
        rm -rf "$work"
    fi
    printf '%s\n' "$dir/haproxy"
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
    # The machine's own services (a packaged PostgreSQL or Redis that is
    # running) are left alone: the tests start their own, on ports and socket
    # directories of their own.
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

# The compose run: podman (there may be no Docker engine) and podman-compose
# run the very docker-compose.yml users run; images a registry would give
# (haproxy, prom/prometheus, the agent's python base) are replaced by ones
# built from Debian's archive and ../shared/haproxy-src
# (deploy/compose/*.Containerfile, deploy/compose/local-images.yml). Images
# are kept in podman's store, rebuilt when their recipe changes.
CONTAINERS_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/matrix-spoa/containers
COMPOSE_HAPROXY=3.0.11   # the major version docker-compose.yml pins (haproxy:3.0.x)

# podman build, unless an image of that name was built from the same inputs.
local_image() {
    local name=$1 key=$2; shift 2
    if [ "$(podman image inspect --format '{{ index .Labels "spoa.inputs" }}' "$name" 2>/dev/null)" = "$key" ]; then
        return 0
    fi
    say "building image $name"
    podman build -q --label "spoa.inputs=$key" -t "$name" "$@" > "$CONTAINERS_DIR/build.log" 2>&1 \
        || { tail -30 "$CONTAINERS_DIR/build.log" >&2; say "building $name failed"; return 1; }
}

ensure_compose() {
    local need=()
    for tool in podman runc iptables mmdebstrap netavark aardvark-dns catatonit; do
        dpkg -s "$tool" >/dev/null 2>&1 || need+=("$tool")
    done
    if [ ${#need[@]} -gt 0 ]; then
        say "installing ${need[*]} (for the compose run)"
        apt_install "${need[@]}" || return 1
    fi
    mkdir -p "$CONTAINERS_DIR"
    # crun refuses hybrid cgroups: runc; the default rlimits cannot be set here.
    local hard
    hard=$(ulimit -Hn)
    printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=32768:32768"]\n[engine]\nruntime = "runc"\n' \
        "$hard" "$hard" > "$CONTAINERS_DIR/containers.conf"
    export CONTAINERS_CONF="$CONTAINERS_DIR/containers.conf"
    if ! podman image exists localhost/debian:bookworm; then
        say "making a Debian 12 base image with mmdebstrap"
        local work mirror=http://deb.debian.org/debian security=http://deb.debian.org/debian-security
        work=$(mktemp -d)
        mmdebstrap --quiet --variant=minbase --include=ca-certificates bookworm "$work/rootfs.tar" \
            "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
            "deb $security bookworm-security main" || return 1
        podman import --change 'CMD ["/bin/bash"]' "$work/rootfs.tar" localhost/debian:bookworm >/dev/null
        rm -rf "$work"
    fi
    local base haproxy context key
    base=$(podman image inspect --format '{{.Id}}' localhost/debian:bookworm)
    haproxy=$(haproxy_build "$COMPOSE_HAPROXY") || return 1
    context=$(mktemp -d)
    cp "$haproxy" "$context/haproxy"
    key=$(cat deploy/compose/haproxy.Containerfile "$haproxy" | sha256sum | cut -c1-16)-$base
    local_image localhost/spoa-local/haproxy:3.0 "$key" -f deploy/compose/haproxy.Containerfile "$context" || return 1
    rm -rf "$context"
    key=$(sha256sum < deploy/compose/prometheus.Containerfile | cut -c1-16)-$base
    local_image localhost/spoa-local/prometheus:debian "$key" -f deploy/compose/prometheus.Containerfile deploy/compose || return 1
    key=$(sha256sum < deploy/compose/python.Containerfile | cut -c1-16)-$base
    local_image localhost/spoa-local/python:3.11-bookworm "$key" -f deploy/compose/python.Containerfile deploy/compose || return 1
    # The agent's image from the repository's Dockerfile, on that base; pip in
    # the build reaches PyPI as this machine's pip does (its configuration
    # and CA bundle).
    local mounts=()
    [ -f /etc/pip.conf ] && mounts+=(-v /etc/pip.conf:/etc/pip.conf:ro)
    [ -f /etc/ssl/certs/ca-certificates.crt ] && mounts+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
    key=$(git ls-files -z Dockerfile pyproject.toml setup.py README.md spoa policies | xargs -0 cat | sha256sum | cut -c1-16)
    local_image matrix-spoa:local "$key-$(podman image inspect --format '{{.Id}}' localhost/spoa-local/python:3.11-bookworm)" \
        "${mounts[@]}" --build-arg PYTHON_IMAGE=localhost/spoa-local/python:3.11-bookworm . || return 1
}

# promtool (tests/test_alerts.py), from Debian's prometheus package unpacked
# into the cache: nothing is installed, no service is started.
PROMTOOL_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/matrix-spoa/promtool
ensure_promtool() {
    if command -v promtool >/dev/null; then
        export SPOA_PROMTOOL=${SPOA_PROMTOOL:-$(command -v promtool)}
        return
    fi
    if [ ! -x "$PROMTOOL_CACHE/usr/bin/promtool" ]; then
        say "unpacking promtool from Debian's prometheus package into $PROMTOOL_CACHE"
        [ "$APT_UPDATED" = 1 ] || { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq; APT_UPDATED=1; }
        local tmp
        tmp=$(mktemp -d)
        (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null) \
            || { rm -rf "$tmp"; say "could not download the prometheus package"; exit 1; }
        rm -rf "$PROMTOOL_CACHE"
        mkdir -p "$PROMTOOL_CACHE"
        dpkg-deb -x "$tmp"/prometheus_*.deb "$PROMTOOL_CACHE"
        rm -rf "$tmp"
    fi
    export SPOA_PROMTOOL="$PROMTOOL_CACHE/usr/bin/promtool"
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
        ensure_promtool
        ensure_venv
        say "ruff"
        "$VENV/bin/ruff" check spoa tests bench setup.py
        "$VENV/bin/ruff" format --check spoa tests bench setup.py
        say "mypy (strict)"
        "$VENV/bin/mypy"
        say "pytest (HAProxy $("$(command -v haproxy || echo /usr/sbin/haproxy)" -v | head -1 | cut -d' ' -f3))"
        "$PY" -m pytest "$@"
        # Then the suites that run HAProxy, on each 3.x build: always in CI,
        # locally when SPOA_HAPROXY_VERSIONS names them (e.g. "3.4.0").
        # The real-Synapse suite (e2e) runs on the newest of them too, the
        # integration suite on each: SPOA_E2E_VERSIONS names where e2e runs.
        versions=${SPOA_HAPROXY_VERSIONS:-}
        [ -n "$versions" ] || [ "${CI:-}" != true ] || versions="3.0.11 3.2.0 3.4.0"
        e2e_versions=${SPOA_E2E_VERSIONS-3.4.0}
        for version in $versions; do
            binary=$(haproxy_build "$version")
            suites="integration"
            case " $e2e_versions " in *" $version "*) suites="integration or e2e" ;; esac
            say "pytest -m '$suites' on HAProxy $version (but the haproxy_free tests)"
            SPOA_HAPROXY=$binary "$PY" -m pytest -m "($suites) and not haproxy_free" "$@"
        done
        # And docker-compose.yml itself, run with podman: always in CI,
        # locally with SPOA_COMPOSE=1.
        if [ "${CI:-}" = true ] || [ "${SPOA_COMPOSE:-}" = 1 ]; then
            ensure_compose
            say "pytest -m compose (docker-compose.yml under podman-compose)"
            SPOA_COMPOSE=1 "$PY" -m pytest -m compose "$@"
        fi
        ;;
    compose-images)
        # ./dev.sh compose-images: podman and the images the compose run uses.
        ensure_venv
        ensure_compose
        ;;
    haproxy)
        # ./dev.sh haproxy VERSION: print the path of HAProxy VERSION, built if needed.
        [ $# -eq 1 ] || { say "usage: ./dev.sh haproxy 3.0.11|3.2.0|3.4.0"; exit 2; }
        haproxy_build "$1"
        ;;
    bench)
        ensure_haproxy
        ensure_venv
        command -v wrk >/dev/null || { say "installing wrk (bench/haproxy_e2e.py)"; apt_install wrk; }
        "$PY" bench/haproxy_e2e.py
        "$PY" bench/spop_load.py "$@"
        "$PY" bench/spop_load.py --rate 75000 "$@"
        "$PY" bench/spop_load.py --policy policies/synapse-workers.yaml "$@"
        "$PY" bench/spop_load.py --policy policies/synapse-workers.yaml --whoami "$@"
        "$PY" bench/decide.py
        "$PY" bench/handler.py
        "$PY" bench/codec.py
        ;;
    *)
        sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
        [ "$cmd" = help ] || exit 2
        ;;
esac

#!/usr/bin/env bash
# Idempotent installer for the competitor baselines (beanstalkd, Celery+Redis).
#
#   bash bench/baselines/setup.sh
#
# - apt-get installs beanstalkd and redis-server (apt-get update only if
#   something is missing; needs root, as on the project's machines).
# - creates a Python venv at ${BENCH_VENV:-<repo>/target/bench-venv} and
#   pip-installs the pinned bench/baselines/requirements.txt into it.
# Environment:
#   BENCH_VENV    venv location (default <repo>/target/bench-venv)
#   BENCH_PYTHON  interpreter used to create the venv (default python3)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${BENCH_VENV:-$REPO/target/bench-venv}"
PY="${BENCH_PYTHON:-python3}"
REQ="$HERE/requirements.txt"

log() { echo "[baselines/setup] $*"; }

if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

# 1. Debian packages -------------------------------------------------------
missing=()
for pkg in beanstalkd redis-server; do
    if is_installed "$pkg"; then
        log "apt: $pkg already installed ($(dpkg-query -W -f='${Version}' "$pkg"))"
    else
        missing+=("$pkg")
    fi
done
# The venv needs ensurepip; on Debian's own python3 that is python3-venv.
if ! "$PY" -c "import ensurepip, venv" >/dev/null 2>&1; then
    if [ "$(command -v "$PY")" = "/usr/bin/python3" ] || [ "$PY" = "python3" ]; then
        missing+=("python3-venv")
    else
        echo "[baselines/setup] ERROR: $PY has no ensurepip/venv module" >&2
        exit 1
    fi
fi
if [ "${#missing[@]}" -gt 0 ]; then
    log "apt: installing ${missing[*]} (apt-get update first)"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
    for pkg in "${missing[@]}"; do
        log "apt: installed $pkg ($(dpkg-query -W -f='${Version}' "$pkg"))"
    done
fi
for bin in beanstalkd redis-server; do
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/bin/$bin" ] && [ ! -x "/usr/sbin/$bin" ]; then
        echo "[baselines/setup] ERROR: $bin not found after install" >&2
        exit 1
    fi
done
log "redis-server: $(redis-server --version 2>/dev/null | head -1)"
log "beanstalkd: $(beanstalkd -v 2>&1 | head -1)"

# 2. Python venv -----------------------------------------------------------
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import sys" >/dev/null 2>&1; then
    log "venv: reusing $VENV ($("$VENV/bin/python" --version 2>&1))"
else
    log "venv: creating $VENV with $PY ($("$PY" --version 2>&1))"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi

if "$VENV/bin/python" - "$REQ" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version, PackageNotFoundError
ok = True
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line or "==" not in line:
        continue
    name, want = line.split("==", 1)
    name = name.split("[", 1)[0].strip()
    want = want.split(";", 1)[0].strip()
    try:
        if version(name) != want:
            ok = False
    except PackageNotFoundError:
        ok = False
sys.exit(0 if ok else 1)
PYEOF
then
    log "pip: all pinned requirements already satisfied"
else
    log "pip: installing pinned requirements from $REQ"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQ"
fi
"$VENV/bin/python" - <<'PYEOF'
from importlib.metadata import version
for n in ("celery", "kombu", "redis", "greenstalk"):
    print(f"[baselines/setup] pip: {n}=={version(n)}")
PYEOF
log "done. Run e.g.: $VENV/bin/python $HERE/beanstalkd_e2e.py --jobs 2000"

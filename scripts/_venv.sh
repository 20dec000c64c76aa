# Shared by scripts/run and scripts/test: create .venv and install a requirements file,
# skipping pip when nothing changed since the last install (idempotent and fast).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

ensure_venv() {
  local requirements="$1"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
  fi
  local stamp="$VENV/.installed-$(basename "$requirements" .txt)"
  local digest
  digest="$(cat "$ROOT"/requirements/*.txt "$ROOT/setup.cfg" | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$requirements" -e "$ROOT"
    echo "$digest" > "$stamp"
  fi
}

apt_install() {
  # apt_install <command-to-check> <debian-package>...: install when missing and root.
  local check="$1"; shift
  command -v "$check" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "scripts: '$check' is missing; install the Debian package(s): $*" >&2
    return 1
  fi
  if [ ! -f /var/lib/apt/periodic/cap-updated ] || [ -z "$(ls /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
    apt-get update -qq
    mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/cap-updated
  fi
  # other sessions on the machine may hold the dpkg lock for a while: retry, then fail
  local attempt
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null && return 0
    echo "scripts: apt-get install $* failed (attempt $attempt; lock?), retrying" >&2
    sleep 15
  done
  return 1
}

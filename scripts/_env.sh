# Shared bootstrap for scripts/test and scripts/demo (sourced, not run).
# Creates the virtualenvs on first use and reinstalls only when pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
# TF_CPP_MIN_LOG_LEVEL=3 also hides TensorFlow's start-up errors about absent GPUs (cuInit).
export PIP_DISABLE_PIP_VERSION_CHECK=1 TF_CPP_MIN_LOG_LEVEL=3

# Bold headings on a terminal; plain text when output goes to a file or a pipe.
if [[ -t 2 && -z "${NO_COLOR:-}" ]]; then
    log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
else
    log() { printf '==> %s\n' "$*" >&2; }
fi

# ensure_venv DIR PIP-ARGS... : create DIR and install PIP-ARGS unless the stamp says it is current.
ensure_venv() {
    local dir="$1"; shift
    # the version too: an editable install's metadata holds the version it was installed at
    local want; want="$(cat "$ROOT/pyproject.toml" "$ROOT/edge/_version.py" <(printf '%s\n' "$@") | sha256sum | cut -c1-16)"
    if [[ -x "$dir/bin/python" && -f "$dir/.stamp" && "$(cat "$dir/.stamp")" == "$want" ]]; then
        return 0
    fi
    log "setting up $(basename "$dir") (first run or pyproject.toml changed; a few minutes)"
    [[ -x "$dir/bin/python" ]] || "$PY" -m venv "$dir"
    # pip's and the build backend's chatter goes to a log, shown only when something fails.
    local out="$dir/bootstrap.log"
    if ! { "$dir/bin/python" -m pip install -q --upgrade pip \
            && (cd "$ROOT" && "$dir/bin/python" -m pip install -q "$@"); } >"$out" 2>&1; then
        cat "$out" >&2
        log "setting up $(basename "$dir") failed (log: $out)"
        return 1
    fi
    echo "$want" > "$dir/.stamp"
}

desktop_venv() { ensure_venv "$ROOT/.venv" -e ".[litert,convert,sim,service,cluster,dev,test]"; }

# The device-like environment: what a Raspberry Pi gets, no TensorFlow, no ai-edge-litert.
device_venv() {
    ensure_venv "$ROOT/.venv-device" -e ".[tflite,service,cluster]" "pytest>=8" "hypothesis>=6.100"
}

ensure_mosquitto() {
    # mosquitto for the broker tests; openssl makes the TLS test's certificates
    local missing=()
    command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || missing+=(mosquitto)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    [[ ${#missing[@]} == 0 ]] && return 0
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing ${missing[*]} with apt-get"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        # The mosquitto package may start a system broker on 1883; the tests never use it.
    else
        log "missing ${missing[*]}: install with sudo apt-get install ${missing[*]}; broker tests will fail"
    fi
}

# Waiting for an `edge-lstm serve` started in the background (sourced by scripts/walkthrough).

# await_serve LOG PID [SECONDS]: 0 once LOG says "connected to". When PID exits first, or
# SECONDS (60) pass, the end of LOG goes to stderr and it returns 1: a serve that refused its
# bundle says why in its own error line, which a bare "did not connect" hid.
await_serve() {
    local log="$1" pid="$2" seconds="${3:-60}"
    for _ in $(seq $((seconds * 10))); do
        grep -q "connected to" "$log" && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    grep -q "connected to" "$log" && return 0
    if kill -0 "$pid" 2>/dev/null; then
        echo "serve did not connect within $seconds s; the end of its log ($log):" >&2
    else
        echo "serve exited before connecting; the end of its log ($log):" >&2
    fi
    tail -n 5 "$log" | sed 's/^/    /' >&2
    return 1
}

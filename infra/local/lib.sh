# shellcheck shell=bash
# Shared by up.sh and down.sh (sourced, never run). Resolves the repo root, the venv, the state
# folder and the ports; holds the process helpers. Every service is started under `setsid`, so
# its pid is also its process-group id and its session id: stopping a service signals only the
# processes of that session, never a `ray stop`-style sweep of the whole machine.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PROG="$(basename "$0")"

die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*"; }

# The virtualenv: $VENV (absolute, or relative to the repo root), default .venv.
VENV="${VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$REPO_ROOT/$VENV" ;; esac
BIN="$VENV/bin"

HOST=127.0.0.1
RAY_PORT="${FCN_RAY_PORT:-6379}"
RAY_DASHBOARD_PORT="${FCN_RAY_DASHBOARD_PORT:-8265}"
RAY_CLIENT_PORT="${FCN_RAY_CLIENT_PORT:-10001}"
MLFLOW_PORT="${FCN_MLFLOW_PORT:-5000}"
PREFECT_PORT="${FCN_PREFECT_PORT:-4200}"
# Ray 2.59+ turns token auth on for new local clusters whenever ~/.ray/auth_token exists, and a
# driver or `ray status` without RAY_AUTH_MODE=token is then refused. Ray's GCS and raylet listen
# on every interface whatever --node-ip-address says, so the default keeps auth on.
RAY_AUTH="${FCN_RAY_AUTH_MODE:-token}"
case "$RAY_AUTH" in token|disabled) ;; *) die "FCN_RAY_AUTH_MODE must be token or disabled, got '$RAY_AUTH'" ;; esac

SERVICES=(ray mlflow prefect)

# resolve_state_dir [DIR]: absolute path of the state folder (created), in STATE_DIR.
resolve_state_dir() {
    local dir="${1:-${FCN_STATE_DIR:-$REPO_ROOT/data/servers}}"
    mkdir -p "$dir" || die "cannot create state folder $dir"
    STATE_DIR="$(cd "$dir" && pwd)"
}

pid_file() { echo "$STATE_DIR/$1.pid"; }

# What each service's leader process runs (guards against a recycled pid in a stale file).
cmd_pattern() {
    case "$1" in
        ray) echo "ray start --head" ;;
        mlflow) echo "mlflow server" ;;
        prefect) echo "prefect server start" ;;
    esac
}

# service_pid NAME: prints the live pid of NAME started from this state folder, or fails.
service_pid() {
    local file pid args
    file="$(pid_file "$1")"
    [[ -f "$file" ]] || return 1
    pid="$(tr -dc '0-9' < "$file")"
    [[ -n "$pid" ]] || return 1
    args="$(ps -o args= -p "$pid" 2>/dev/null)" || return 1
    [[ "$args" == *"$(cmd_pattern "$1")"* ]] || return 1
    echo "$pid"
}

# session_pids SID: every process in session SID (the service's own tree, workers included).
session_pids() { ps -eo pid=,sid= | awk -v s="$1" '$2 == s { print $1 }'; }

# wait_session_gone SID SECONDS
wait_session_gone() {
    local sid="$1" deadline=$((SECONDS + $2))
    while [[ -n "$(session_pids "$sid")" ]]; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

# kill_session NAME SID: SIGTERM every process left in session SID, then SIGKILL.
kill_session() {
    local name="$1" sid="$2" left
    left="$(session_pids "$sid")"
    [[ -z "$left" ]] && return 0
    # shellcheck disable=SC2086
    kill -TERM $left 2>/dev/null || true
    wait_session_gone "$sid" 5 && return 0
    left="$(session_pids "$sid")"
    # shellcheck disable=SC2086
    [[ -n "$left" ]] && kill -KILL $left 2>/dev/null
    wait_session_gone "$sid" 5 || echo "$PROG: $name: could not stop pids: $left" >&2
}

# stop_session NAME PID: SIGTERM the leader (each server shuts its own children down), then
# SIGTERM what is left of its session, then SIGKILL.
stop_session() {
    local name="$1" pid="$2"
    kill -TERM "$pid" 2>/dev/null || true
    wait_session_gone "$pid" "${FCN_STOP_TIMEOUT:-20}" && return 0
    echo "$PROG: $name: still running after SIGTERM; signalling the rest of its session" >&2
    kill_session "$name" "$pid"
}

# port_busy PORT: true when something listens on PORT (on any address).
port_busy() {
    "$BIN/python" - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("0.0.0.0", int(sys.argv[1])))
except OSError:
    sys.exit(0)
sys.exit(1)
PY
}

http_ok() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 5 "$1" 2>/dev/null
    else
        "$BIN/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
            "$1" >/dev/null 2>&1
    fi
}

ray_ok() {
    RAY_AUTH_MODE="$RAY_AUTH" timeout 30 "$BIN/ray" status --address "$HOST:$RAY_PORT" \
        >/dev/null 2>&1
}

# service_ready NAME: the service answers its health check.
service_ready() {
    case "$1" in
        ray) ray_ok ;;
        mlflow) http_ok "http://$HOST:$MLFLOW_PORT/health" ;;
        prefect) http_ok "http://$HOST:$PREFECT_PORT/api/health" ;;
    esac
}

service_url() {
    case "$1" in
        ray) echo "$HOST:$RAY_PORT (dashboard http://$HOST:$RAY_DASHBOARD_PORT)" ;;
        mlflow) echo "http://$HOST:$MLFLOW_PORT" ;;
        prefect) echo "http://$HOST:$PREFECT_PORT/api (UI http://$HOST:$PREFECT_PORT)" ;;
    esac
}

#!/usr/bin/env bash
# Start the local FCN stack on 127.0.0.1: a Ray head, an MLflow tracking server and a Prefect
# server, each in the background with its pid and log in the state folder. Waits until each
# answers, then writes STATE_DIR/env.sh (RAY_ADDRESS, MLFLOW_TRACKING_URI, PREFECT_API_URL).
#
#   infra/local/up.sh [--postgres URI] [STATE_DIR]      (STATE_DIR default: ./data/servers)
#
# Ports: FCN_RAY_PORT (6379), FCN_RAY_DASHBOARD_PORT (8265), FCN_RAY_CLIENT_PORT (10001),
# FCN_MLFLOW_PORT (5000), FCN_PREFECT_PORT (4200). Other knobs: FCN_MLFLOW_BACKEND_URI (any
# MLflow backend URI; --postgres sets it), FCN_MLFLOW_WORKERS (1), FCN_RAY_NUM_CPUS,
# FCN_RAY_AUTH_MODE (token|disabled, default token), FCN_UP_TIMEOUT (180 s), VENV (.venv).
# Stop with infra/local/down.sh [STATE_DIR].
set -euo pipefail
# shellcheck source=infra/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

backend_uri="${FCN_MLFLOW_BACKEND_URI:-}"
state_arg=""
while (($#)); do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --postgres) (($# >= 2)) || die "--postgres needs a URI (postgresql://USER:PASS@HOST:PORT/DB)"
                    backend_uri="$2"; shift 2
                    [[ "$backend_uri" == postgresql://* || "$backend_uri" == postgresql+* ]] \
                        || die "--postgres expects postgresql://USER:PASS@HOST:PORT/DB, got '$backend_uri'" ;;
        --postgres=*) backend_uri="${1#--postgres=}"; shift ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z "$state_arg" ]] || die "one STATE_DIR only (got '$state_arg' and '$1')"
           state_arg="$1"; shift ;;
    esac
done

for tool in ray mlflow prefect python; do
    [[ -x "$BIN/$tool" ]] || die "$BIN/$tool not found: create the virtualenv (VENV=$VENV) first"
done
command -v setsid >/dev/null 2>&1 || die "setsid (util-linux) is required"

resolve_state_dir "$state_arg"
CONF="$STATE_DIR/stack.conf"

# A stack already (partly) running from this folder keeps the ports it was started with.
running=()
for svc in "${SERVICES[@]}"; do
    if service_pid "$svc" >/dev/null; then running+=("$svc"); fi
done
if ((${#running[@]})) && [[ -f "$CONF" ]]; then
    # shellcheck source=/dev/null
    source "$CONF"
fi

if [[ -z "$backend_uri" ]]; then
    backend_uri="sqlite:///$STATE_DIR/mlflow/mlflow.db"
elif [[ "$backend_uri" == postgresql* ]]; then
    "$BIN/python" -c "import psycopg2" 2>/dev/null \
        || die "a PostgreSQL backend needs psycopg2 in $VENV: $BIN/pip install psycopg2-binary"
fi
masked_backend="$(sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#' <<<"$backend_uri")"

# --- start what is not running -------------------------------------------------------------

STARTED=()
UP_DONE=0
on_exit() {
    local rc=$?
    ((UP_DONE)) && return
    ((${#STARTED[@]})) || return
    echo "$PROG: stopping what this run started (${STARTED[*]})" >&2
    local svc pid
    for svc in "${STARTED[@]}"; do
        if pid="$(service_pid "$svc")"; then stop_session "$svc" "$pid"; fi
        rm -f "$(pid_file "$svc")"
    done
    cleanup_ray_tmp
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

cleanup_ray_tmp() {
    local f="$STATE_DIR/ray.tmpdir" dir
    [[ -f "$f" ]] || return 0
    dir="$(cat "$f")"
    [[ "$dir" == */fcn-ray.* && -d "$dir" ]] && rm -rf "$dir"
    rm -f "$f" "$STATE_DIR/ray-session"
}

require_free() {  # NAME PORT VARIABLE
    if port_busy "$2"; then
        die "$1: port $2 is already in use; pick another with $3=PORT (a leftover of an earlier stack here? infra/local/down.sh $STATE_DIR)"
    fi
}

start_log() {
    printf '\n=== %s: %s starting (%s) ===\n' "$(date '+%F %T')" "$1" "$PROG" >>"$STATE_DIR/$1.log"
}

check_ports() {  # NAME: every port NAME needs is free (checked before anything starts)
    case "$1" in
        ray) require_free ray "$RAY_PORT" FCN_RAY_PORT
             require_free "ray dashboard" "$RAY_DASHBOARD_PORT" FCN_RAY_DASHBOARD_PORT
             require_free "ray client server" "$RAY_CLIENT_PORT" FCN_RAY_CLIENT_PORT ;;
        mlflow) require_free mlflow "$MLFLOW_PORT" FCN_MLFLOW_PORT ;;
        prefect) require_free prefect "$PREFECT_PORT" FCN_PREFECT_PORT ;;
    esac
}

start_ray() {
    if [[ "$RAY_AUTH" == token ]]; then
        # The head and its drivers share the token in ~/.ray/auth_token; make one if missing.
        RAY_AUTH_MODE=token "$BIN/ray" get-auth-token --generate >/dev/null 2>&1 \
            || die "ray: could not create the auth token (~/.ray/auth_token)"
    fi
    # Ray's own temp dir holds its sockets (paths must stay under ~107 bytes) and logs. Not the
    # shared /tmp/ray: a head registered there becomes the cluster every argument-less
    # ray.init() on this machine joins (other users' scripts, test sessions).
    local ray_tmp="$STATE_DIR/ray"
    if ((${#ray_tmp} > 40)); then
        ray_tmp="$(mktemp -d "${TMPDIR:-/tmp}/fcn-ray.XXXXXX")"
        echo "$ray_tmp" >"$STATE_DIR/ray.tmpdir"
    fi
    mkdir -p "$ray_tmp"
    ln -sfn "$ray_tmp/session_latest" "$STATE_DIR/ray-session"
    local extra=()
    [[ -n "${FCN_RAY_NUM_CPUS:-}" ]] && extra+=(--num-cpus "$FCN_RAY_NUM_CPUS")
    start_log ray
    # Drain timeout 0: on SIGTERM the head stops at once (no 30 s drain for Ray Serve).
    RAY_AUTH_MODE="$RAY_AUTH" RAY_USAGE_STATS_ENABLED=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
        setsid "$BIN/ray" start --head --block --port "$RAY_PORT" \
        --dashboard-host "$HOST" --dashboard-port "$RAY_DASHBOARD_PORT" \
        --ray-client-server-port "$RAY_CLIENT_PORT" --temp-dir "$ray_tmp" \
        --disable-usage-stats "${extra[@]}" </dev/null >>"$STATE_DIR/ray.log" 2>&1 &
    echo $! >"$(pid_file ray)"
}

start_mlflow() {
    mkdir -p "$STATE_DIR/mlflow/artifacts"
    start_log mlflow
    # The backend goes in MLFLOW_BACKEND_STORE_URI (the env twin of --backend-store-uri), so a
    # PostgreSQL password never shows in `ps`. Job execution (GenAI judges/optimizers) is off
    # unless asked for: it adds seven huey consumer processes the pipeline never uses.
    MLFLOW_BACKEND_STORE_URI="$backend_uri" \
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
        setsid "$BIN/mlflow" server --host "$HOST" --port "$MLFLOW_PORT" \
        --artifacts-destination "$STATE_DIR/mlflow/artifacts" --serve-artifacts \
        --workers "${FCN_MLFLOW_WORKERS:-1}" </dev/null >>"$STATE_DIR/mlflow.log" 2>&1 &
    echo $! >"$(pid_file mlflow)"
}

start_prefect() {
    mkdir -p "$STATE_DIR/prefect"
    start_log prefect
    # PREFECT_API_URL for the server itself: its UI points its browser calls there.
    PREFECT_HOME="$STATE_DIR/prefect" PREFECT_SERVER_API_HOST="$HOST" \
        PREFECT_SERVER_API_PORT="$PREFECT_PORT" PREFECT_SERVER_ANALYTICS_ENABLED=false \
        PREFECT_API_URL="http://$HOST:$PREFECT_PORT/api" \
        setsid "$BIN/prefect" server start --host "$HOST" --port "$PREFECT_PORT" \
        </dev/null >>"$STATE_DIR/prefect.log" 2>&1 &
    echo $! >"$(pid_file prefect)"
}

for svc in "${SERVICES[@]}"; do
    service_pid "$svc" >/dev/null || check_ports "$svc"
done
for svc in "${SERVICES[@]}"; do
    if pid="$(service_pid "$svc")"; then
        say "$svc: already running (pid $pid)"
    else
        rm -f "$(pid_file "$svc")"
        [[ "$svc" == ray ]] && cleanup_ray_tmp
        "start_$svc"
        STARTED+=("$svc")
        say "$svc: starting (pid $(cat "$(pid_file "$svc")"), log $STATE_DIR/$svc.log)"
    fi
done

cat >"$CONF" <<EOF
# Ports of the stack in this folder (written by up.sh; re-read while it runs).
RAY_PORT=$RAY_PORT
RAY_DASHBOARD_PORT=$RAY_DASHBOARD_PORT
RAY_CLIENT_PORT=$RAY_CLIENT_PORT
MLFLOW_PORT=$MLFLOW_PORT
PREFECT_PORT=$PREFECT_PORT
RAY_AUTH=$RAY_AUTH
EOF

# --- wait until each answers -----------------------------------------------------------------

timeout_s="${FCN_UP_TIMEOUT:-180}"
deadline=$((SECONDS + timeout_s))
t0=$SECONDS
pending=("${SERVICES[@]}")
while ((${#pending[@]})); do
    still=()
    for svc in "${pending[@]}"; do
        if ! service_pid "$svc" >/dev/null; then
            echo "$PROG: error: $svc exited during start-up; last lines of $STATE_DIR/$svc.log:" >&2
            tail -n 25 "$STATE_DIR/$svc.log" >&2 || true
            exit 1
        elif service_ready "$svc"; then
            if [[ " ${STARTED[*]-} " == *" $svc "* ]]; then say "$svc: ready after $((SECONDS - t0)) s"; fi
        else
            still+=("$svc")
        fi
    done
    pending=("${still[@]+"${still[@]}"}")
    ((${#pending[@]})) || break
    if ((SECONDS >= deadline)); then
        die "not answering after ${timeout_s} s: ${pending[*]} (see $STATE_DIR/<name>.log; FCN_UP_TIMEOUT raises the limit)"
    fi
    sleep 1
done

cat >"$STATE_DIR/env.sh" <<EOF
# The local FCN stack in $STATE_DIR (written by infra/local/up.sh, $(date '+%F %T')).
export RAY_ADDRESS=$HOST:$RAY_PORT
export RAY_AUTH_MODE=$RAY_AUTH
export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT
export PREFECT_API_URL=http://$HOST:$PREFECT_PORT/api
EOF
UP_DONE=1

if ((${#STARTED[@]})); then say "the local stack is up (state: $STATE_DIR)"
else say "already up: nothing to start (state: $STATE_DIR)"; fi
printf '  %-8s %s\n' Ray "$(service_url ray)" MLflow "$(service_url mlflow)" \
    Prefect "$(service_url prefect)"
[[ " ${STARTED[*]} " == *" mlflow "* ]] && printf '  %-8s %s\n' "" "backend $masked_backend"
if [[ "$STATE_DIR" == "$REPO_ROOT/data/servers" ]]; then hint="source infra/local/env.sh"
else hint="source infra/local/env.sh $STATE_DIR"; fi
echo "Point your shell at it:  $hint    (stop: infra/local/down.sh${state_arg:+ $STATE_DIR})"

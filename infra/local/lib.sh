# shellcheck shell=bash
# Shared by up.sh and down.sh (sourced, never run). Resolves the repo root, the venv, the state
# folder and the ports; holds the process helpers. Every service is started under `setsid`, so
# its pid is also its process-group id and its session id: stopping a service signals only the
# processes of that session, never a `ray stop`-style sweep of the whole machine.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PROG="$(basename "$0")"
# This folder as the hints print it: relative from the repo root, else absolute (a user who ran
# the script from elsewhere can paste the command where they are).
if [[ "$PWD" == "$REPO_ROOT" ]]; then SCRIPTS=infra/local; else SCRIPTS="$REPO_ROOT/infra/local"; fi

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

# The services of a stack, in start order (s3 and postgres only with --s3 / --postgres): the
# stores first, MLflow once they answer. down.sh stops the stores last.
ALL_SERVICES=(s3 postgres mlflow ray prefect)
SERVICES=(ray mlflow prefect)  # the default stack
S3_REGION=us-east-1
S3_BUCKET="${FCN_S3_BUCKET:-fcn}"

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
        s3) echo "weed server" ;;
        postgres) echo "postgres -D" ;;
    esac
}

# How each leader is asked to stop, and how long it gets before the rest of its session is
# signalled. PostgreSQL: SIGINT is its "fast" shutdown (SIGTERM waits for clients to leave).
# SeaweedFS drains for ~25 s on SIGTERM although its data is already on disk: SIGKILL after 3 s.
stop_signal() { case "$1" in postgres) echo INT ;; *) echo TERM ;; esac; }
stop_timeout() {
    case "$1" in
        s3) echo "${FCN_S3_STOP_TIMEOUT:-3}" ;;
        *) echo "${FCN_STOP_TIMEOUT:-20}" ;;
    esac
}

# service_pid NAME: prints the live pid of NAME started from this state folder, or fails.
service_pid() {
    local file pid args
    file="$(pid_file "$1")"
    [[ -f "$file" ]] || return 1
    pid="$(tr -dc '0-9' < "$file")"
    [[ -n "$pid" ]] || return 1
    # -ww: the whole command line. Without it ps cuts it at $COLUMNS (set in many CI shells),
    # and a venv under a long path left "prefect server star" of a live server.
    args="$(ps -ww -o args= -p "$pid" 2>/dev/null)" || return 1
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

# stop_session NAME PID: signal the leader (SIGTERM; SIGINT for PostgreSQL: each server shuts
# its own children down), then SIGTERM what is left of its session, then SIGKILL.
stop_session() {
    local name="$1" pid="$2" sig
    sig="$(stop_signal "$name")"
    kill -"$sig" "$pid" 2>/dev/null || true
    wait_session_gone "$pid" "$(stop_timeout "$name")" && return 0
    if [[ "$name" == s3 ]]; then  # weed ignores a second SIGTERM as well: no use waiting
        local left
        left="$(session_pids "$pid")"
        # shellcheck disable=SC2086
        [[ -n "$left" ]] && kill -KILL $left 2>/dev/null
        wait_session_gone "$pid" 5 && return 0
    fi
    echo "$PROG: $name: still running after SIG$sig; signalling the rest of its session" >&2
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

# free_ports N: N distinct ports free right now (bound to port 0 together, then released).
free_ports() {
    "$BIN/python" - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("0.0.0.0", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# new_secret: a random URL- and shell-safe token.
new_secret() { "$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(24))'; }

http_ok() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 5 "$1" 2>/dev/null
    else
        "$BIN/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
            "$1" >/dev/null 2>&1
    fi
}

# The head answers, and its Ray Client server listens: that server waits (30 s at most) for
# the raylet to register before it binds its port, and if it gives up, `ray start --block`
# stops the whole head. On a loaded machine that happened after `ray status` had answered.
ray_ok() {
    RAY_AUTH_MODE="$RAY_AUTH" timeout 30 "$BIN/ray" status --address "$HOST:$RAY_PORT" \
        >/dev/null 2>&1 && port_listening "$RAY_CLIENT_PORT"
}

# port_listening PORT: some socket of this machine listens on TCP PORT, on any address (the
# Ray Client server binds the node's IP, not always 127.0.0.1).
port_listening() {
    local hex
    hex="$(printf '%04X' "$1")"
    awk -v p=":$hex" '$2 ~ (p "$") && $4 == "0A" { found = 1 } END { exit !found }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# --- S3 (SeaweedFS) and PostgreSQL state: STATE_DIR/s3 and STATE_DIR/postgres ---------------
# Credentials are generated once and kept (mode 600) in STATE_DIR/<name>/credentials; the ports
# in STATE_DIR/<name>/port (FCN_S3_PORT / FCN_POSTGRES_PORT, else a free port at first start).

# load_s3_state: S3_PORT, S3_ACCESS_KEY, S3_SECRET_KEY (when STATE_DIR/s3 has them).
load_s3_state() {
    local dir="$STATE_DIR/s3"
    S3_PORT="" S3_ACCESS_KEY="" S3_SECRET_KEY=""
    [[ -f "$dir/port" ]] && S3_PORT="$(tr -dc '0-9' <"$dir/port")"
    # shellcheck source=/dev/null
    [[ -f "$dir/credentials" ]] && source "$dir/credentials"
    return 0
}

# load_pg_state: POSTGRES_PORT, PG_ADMIN_PASSWORD, PG_MLFLOW_PASSWORD, PG_DATA.
load_pg_state() {
    local dir="$STATE_DIR/postgres"
    POSTGRES_PORT="" PG_ADMIN_PASSWORD="" PG_MLFLOW_PASSWORD=""
    [[ -f "$dir/port" ]] && POSTGRES_PORT="$(tr -dc '0-9' <"$dir/port")"
    # shellcheck source=/dev/null
    [[ -f "$dir/credentials" ]] && source "$dir/credentials"
    PG_DATA="$dir/data"
    # A cluster kept outside STATE_DIR (the PostgreSQL account could not reach STATE_DIR).
    [[ -f "$dir/datadir" ]] && PG_DATA="$(cat "$dir/datadir")"
    return 0
}

s3_endpoint() { echo "http://$HOST:$S3_PORT"; }

# pg_mlflow_uri: the MLflow database of the local PostgreSQL (holds the password: never print).
pg_mlflow_uri() { echo "postgresql://mlflow:$PG_MLFLOW_PASSWORD@$HOST:$POSTGRES_PORT/mlflow"; }

# s3_check [BUCKET]: S3 answers with our credentials (a volume server has registered, so
# writes work too); with BUCKET, also create it if missing. Secrets travel in the environment.
s3_check() {
    S3_ENDPOINT="$(s3_endpoint)" S3_MASTER_PORT="$(cat "$STATE_DIR/s3/master-port" 2>/dev/null)" \
        AK="$S3_ACCESS_KEY" SK="$S3_SECRET_KEY" BUCKET="${1:-}" REGION="$S3_REGION" \
        timeout 60 "$BIN/python" - <<'PY' >/dev/null 2>&1
import json, os, sys, urllib.request
from pyarrow import fs
with urllib.request.urlopen(f"http://127.0.0.1:{os.environ['S3_MASTER_PORT']}/dir/status",
                            timeout=3) as r:
    topo = json.load(r)["Topology"]
if not [n for dc in topo.get("DataCenters") or [] for rack in dc.get("Racks") or []
        for n in rack.get("DataNodes") or []]:
    sys.exit(1)
s3 = fs.S3FileSystem(access_key=os.environ["AK"], secret_key=os.environ["SK"],
                     region=os.environ["REGION"], endpoint_override=os.environ["S3_ENDPOINT"],
                     connect_timeout=2, request_timeout=5, allow_bucket_creation=True)
s3.get_file_info(fs.FileSelector(""))
if os.environ["BUCKET"]:
    s3.create_dir(os.environ["BUCKET"])
PY
}

# pg_check [setup]: PostgreSQL accepts the superuser's password; with "setup", also create the
# role and database "mlflow" (owned by that role) if missing.
pg_check() {
    PGPORT_="$POSTGRES_PORT" ADMIN_PW="$PG_ADMIN_PASSWORD" MLFLOW_PW="$PG_MLFLOW_PASSWORD" \
        SETUP="${1:-}" timeout 30 "$BIN/python" - <<'PY' >/dev/null 2>&1
import os
import psycopg2
from psycopg2 import sql
conn = psycopg2.connect(host="127.0.0.1", port=int(os.environ["PGPORT_"]), user="postgres",
                        password=os.environ["ADMIN_PW"], dbname="postgres", connect_timeout=3)
conn.autocommit = True
if os.environ["SETUP"]:
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = 'mlflow'")
        verb = "ALTER" if cur.fetchone() else "CREATE"
        cur.execute(sql.SQL(verb + " ROLE mlflow LOGIN PASSWORD %s"), (os.environ["MLFLOW_PW"],))
        cur.execute("SELECT 1 FROM pg_database WHERE datname = 'mlflow'")
        if not cur.fetchone():
            cur.execute("CREATE DATABASE mlflow OWNER mlflow")
conn.close()
PY
}

# The account PostgreSQL runs as when this script runs as root (initdb and postgres refuse
# root): FCN_POSTGRES_USER, else the distribution's "postgres", else "nobody".
pg_account() {
    local u
    for u in ${FCN_POSTGRES_USER:-} postgres nobody; do
        if id -u "$u" >/dev/null 2>&1; then echo "$u"; return 0; fi
    done
    return 1
}

# pg_as: sets PG_AS, the command prefix that runs a program as that account when root (empty
# otherwise), and PG_USER. setpriv execs, so a pid we record is postgres itself (runuser, the
# fallback, stays in between and forwards signals).
pg_as() {
    PG_AS=()
    PG_USER="$(id -un)"
    ((EUID == 0)) || return 0
    PG_USER="$(pg_account)" || die "postgres: no unprivileged account to run PostgreSQL as (set FCN_POSTGRES_USER)"
    if command -v setpriv >/dev/null 2>&1; then
        PG_AS=(setpriv --reuid="$(id -u "$PG_USER")" --regid="$(id -g "$PG_USER")" --clear-groups --)
    else
        PG_AS=(runuser -u "$PG_USER" --)
    fi
}

# pg_bindir: the folder of initdb and postgres (Debian keeps them off PATH).
pg_bindir() {
    local d
    if command -v pg_config >/dev/null 2>&1; then
        d="$(pg_config --bindir 2>/dev/null)"
        [[ -x "$d/initdb" && -x "$d/postgres" ]] && { echo "$d"; return 0; }
    fi
    local found="" v best=-1
    for d in /usr/lib/postgresql/*/bin; do
        v="${d#/usr/lib/postgresql/}"; v="${v%/bin}"
        [[ "$v" =~ ^[0-9]+$ && -x "$d/initdb" && -x "$d/postgres" ]] || continue
        if ((v > best)); then best="$v"; found="$d"; fi
    done
    [[ -n "$found" ]] && echo "$found"
}

# service_ready NAME: the service answers its health check.
service_ready() {
    case "$1" in
        ray) ray_ok ;;
        mlflow) http_ok "http://$HOST:$MLFLOW_PORT/health" ;;
        prefect) http_ok "http://$HOST:$PREFECT_PORT/api/health" ;;
        s3) s3_check ;;
        postgres) pg_check ;;
    esac
}

service_url() {
    case "$1" in
        ray) echo "$HOST:$RAY_PORT (dashboard http://$HOST:$RAY_DASHBOARD_PORT)" ;;
        mlflow) echo "http://$HOST:$MLFLOW_PORT" ;;
        prefect) echo "http://$HOST:$PREFECT_PORT/api (UI http://$HOST:$PREFECT_PORT)" ;;
        s3) echo "$(s3_endpoint) (access key $S3_ACCESS_KEY, secret in $STATE_DIR/s3/credentials)" ;;
        postgres) echo "postgresql://mlflow:***@$HOST:$POSTGRES_PORT/mlflow (passwords in $STATE_DIR/postgres/credentials)" ;;
    esac
}

#!/usr/bin/env bash
# Stop the local FCN stack that infra/local/up.sh started from STATE_DIR (default
# ./data/servers), the S3 and PostgreSQL servers of --s3/--postgres included. Only the processes
# recorded in STATE_DIR/*.pid (and their sessions) are signalled: never `ray stop`, which would
# end every Ray on the machine. Their data stays in STATE_DIR for the next up.sh.
#
#   infra/local/down.sh [STATE_DIR]
set -euo pipefail
# shellcheck source=infra/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "${1:-}" in
    -h|--help) sed -n '2,7s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) die "unknown option $1 (usage: $PROG [STATE_DIR])" ;;
esac
(($# <= 1)) || die "one STATE_DIR only (usage: $PROG [STATE_DIR])"

dir="${1:-${FCN_STATE_DIR:-$REPO_ROOT/data/servers}}"
[[ -d "$dir" ]] || { say "nothing to stop: no state folder $dir"; exit 0; }
resolve_state_dir "$dir"

stopped=0
# Prefect and MLflow first, then Ray (drivers of a flow may still be talking to it), the stores
# MLflow used last.
for svc in prefect mlflow ray postgres s3; do
    file="$(pid_file "$svc")"
    if pid="$(service_pid "$svc")"; then
        stop_session "$svc" "$pid"
        say "$svc: stopped (pid $pid)"
        stopped=$((stopped + 1))
    elif [[ -f "$file" ]]; then
        pid="$(tr -dc '0-9' <"$file")"
        # The leader died (crash, kill -9) but processes of its session live on (Ray's GCS,
        # raylet, workers): they still hold the ports.
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null && [[ -n "$(session_pids "$pid")" ]]; then
            kill_session "$svc" "$pid"
            say "$svc: leader (pid $pid) was gone; stopped the rest of its session"
            stopped=$((stopped + 1))
        else
            say "$svc: not running (removing stale $(basename "$file"))"
        fi
    fi
    rm -f "$file"
done

# The Unix sockets weed leaves in /tmp when it is killed (named after the ports it had).
if [[ -f "$STATE_DIR/s3/ports" ]] && ! service_pid s3 >/dev/null; then
    for port in $(tr -dc '0-9 ' <"$STATE_DIR/s3/ports"); do
        rm -f "${TMPDIR:-/tmp}"/seaweedfs-*-"$port".sock
    done
fi

# A Ray temp dir made under /tmp (when STATE_DIR's path is too long for Ray's sockets).
if [[ -f "$STATE_DIR/ray.tmpdir" ]]; then
    ray_tmp="$(cat "$STATE_DIR/ray.tmpdir")"
    [[ "$ray_tmp" == */fcn-ray.* && -d "$ray_tmp" ]] && rm -rf "$ray_tmp"
    rm -f "$STATE_DIR/ray.tmpdir" "$STATE_DIR/ray-session"
fi

if ((stopped)); then say "the local stack is down (state kept in $STATE_DIR)"
else say "already down: nothing running from $STATE_DIR"; fi

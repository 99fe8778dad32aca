# shellcheck shell=bash
# Point this shell at the local FCN stack started by infra/local/up.sh:
#
#   source infra/local/env.sh [STATE_DIR]        (STATE_DIR default: ./data/servers)
#
# Loads STATE_DIR/env.sh written by up.sh (the ports it really used; with up.sh --s3 also
# AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and
# MLFLOW_S3_ENDPOINT_URL); without one, exports the default addresses (FCN_RAY_PORT,
# FCN_MLFLOW_PORT, FCN_PREFECT_PORT, FCN_RAY_AUTH_MODE). Sourced, so it sets no shell options and
# leaves no variables behind but those exports. Prints the addresses, never the secret key.
_fcn_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/../.." && pwd)"
_fcn_state="${1:-${FCN_STATE_DIR:-$_fcn_root/data/servers}}"
if [ -f "$_fcn_state/env.sh" ]; then
    # shellcheck source=/dev/null
    . "$_fcn_state/env.sh"
else
    echo "env.sh: no $_fcn_state/env.sh (stack not started there?); using the default ports" >&2
    export RAY_ADDRESS="127.0.0.1:${FCN_RAY_PORT:-6379}"
    export RAY_AUTH_MODE="${FCN_RAY_AUTH_MODE:-token}"
    export MLFLOW_TRACKING_URI="http://127.0.0.1:${FCN_MLFLOW_PORT:-5000}"
    export PREFECT_API_URL="http://127.0.0.1:${FCN_PREFECT_PORT:-4200}/api"
fi
echo "RAY_ADDRESS=$RAY_ADDRESS MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI PREFECT_API_URL=$PREFECT_API_URL"
if grep -q '^export AWS_ENDPOINT_URL=' "$_fcn_state/env.sh" 2>/dev/null; then
    echo "AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID (secret key set)"
fi
unset _fcn_root _fcn_state

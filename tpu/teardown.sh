#!/usr/bin/env bash
# Delete a TPU VM / pod slice, or a queued resource together with its node.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
. "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
usage: $JX_PROG [--name NAME] [--zone ZONE] [--project P] [--queued] [-y] [--async] [--dry-run]

Deletes the TPU VM NAME ('gcloud compute tpus tpu-vm delete'), or with --queued (QUEUED=1) the queued
resource NAME and its node ('gcloud compute tpus queued-resources delete --force'). Asks first unless
-y (YES=1). Worker disks go with it: logs there are lost unless the run dir was gs:// (launch.sh copies
them to RUN_DIR/logs when the run ends).

Environment: NAME, ZONE (required), PROJECT, QUEUED, YES, DRY_RUN.
USAGE
}

ASYNC=()
while [ $# -gt 0 ]; do
  case $1 in
    --async) ASYNC=(--async); shift ;;
    *) jx_common_flag "$@" || jx_usage_error "unknown argument: $1"; shift "$JX_SHIFT" ;;
  esac
done
jx_require_tpu
jx_need_gcloud

what="TPU VM $NAME"
[ "$QUEUED" = 0 ] || what="queued resource $NAME and its TPU"
if ! jx_confirm "Delete $what in $ZONE${PROJECT:+ (project $PROJECT)}?"; then
  jx_info "not deleted"
  exit 1
fi
# gcloud's own prompt is answered above: --quiet.
if [ "$QUEUED" = 1 ]; then
  jx_gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" --force --quiet "${ASYNC[@]}"
else
  jx_gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --quiet "${ASYNC[@]}"
fi

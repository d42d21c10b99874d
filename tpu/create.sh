#!/usr/bin/env bash
# Create a TPU VM or pod slice (directly, or through a queued resource) and wait until it is ready.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
. "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
usage: $JX_PROG [--name NAME] [--zone ZONE] [--accelerator-type TYPE] [--runtime-version V]
                [--project P] [--queued] [--spot | --preemptible] [--no-wait] [--dry-run]
                [-- EXTRA GCLOUD FLAGS]

Creates the TPU VM (or pod slice) NAME with 'gcloud compute tpus tpu-vm create', or with --queued
(QUEUED=1) a queued resource NAME whose node is also called NAME ('gcloud compute tpus
queued-resources create'), then waits until the queued resource is ACTIVE (--no-wait skips that).
Flags after -- go to the create command as they are (e.g. -- --reserved --network=my-net).

Environment: NAME, ZONE, ACCELERATOR_TYPE (required), RUNTIME_VERSION (default: the recommended one
for the accelerator), PROJECT, QUEUED, SPOT, PREEMPTIBLE, DRY_RUN, POLL_SECONDS (default 30).
USAGE
}

WAIT=1
EXTRA=()
while [ $# -gt 0 ]; do
  case $1 in
    --no-wait) WAIT=0; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) jx_common_flag "$@" || jx_usage_error "unknown argument: $1"; shift "$JX_SHIFT" ;;
  esac
done
jx_require_tpu
jx_require ACCELERATOR_TYPE --accelerator-type v4-32
[ -n "$RUNTIME_VERSION" ] || RUNTIME_VERSION=$(jx_default_runtime)
[ "$SPOT" = 1 ] && [ "$PREEMPTIBLE" = 1 ] && jx_die "SPOT and PREEMPTIBLE are exclusive: pick one"
jx_need_gcloud

hosts=$(jx_num_hosts)
jx_info "$ACCELERATOR_TYPE (${hosts:-?} host(s)), runtime $RUNTIME_VERSION, zone $ZONE"

if [ "$QUEUED" = 0 ]; then
  cap=()
  [ "$SPOT" = 1 ] && cap=(--spot)
  [ "$PREEMPTIBLE" = 1 ] && cap=(--preemptible)
  jx_gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${cap[@]}" "${EXTRA[@]}"
  exit 0
fi

[ "$PREEMPTIBLE" = 1 ] && jx_die "queued resources have no --preemptible: use --spot"
cap=()
[ "$SPOT" = 1 ] && cap=(--spot)
jx_gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" --zone="$ZONE" \
  --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${cap[@]}" "${EXTRA[@]}"
[ "$WAIT" = 1 ] || exit 0

describe=(compute tpus queued-resources describe "$NAME" --zone="$ZONE" --format='value(state.state)')
if [ "$DRY_RUN" = 1 ]; then
  jx_gcloud "${describe[@]}"
  jx_info "dry run: would poll the state above until ACTIVE"
  exit 0
fi
jx_info "waiting for queued resource $NAME to become ACTIVE (Ctrl-C stops waiting, not the request)"
while :; do
  state=$(jx_gcloud "${describe[@]}" 2>/dev/null || echo UNKNOWN)
  case $state in
    ACTIVE) jx_info "$NAME is ACTIVE"; exit 0 ;;
    FAILED | SUSPENDED | SUSPENDING) jx_die "queued resource $NAME is $state: see" \
      "'gcloud compute tpus queued-resources describe $NAME --zone=$ZONE', then tpu/teardown.sh --queued" ;;
  esac
  jx_info "state: $state"
  sleep "${POLL_SECONDS:-30}"
done

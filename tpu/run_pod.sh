#!/usr/bin/env bash
# One command for a whole run: create -> install -> launch -> logs (-> teardown).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
. "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
usage: $JX_PROG --name NAME --zone ZONE --accelerator-type TYPE --config FILE|gs://URI --run-dir gs://...
                [--set KEY.PATH=VALUE ...] [--env KEY[=VALUE] ...] [--project P] [--runtime-version V]
                [--queued] [--spot | --preemptible] [--git URL] [--ref REF] [--extras E]
                [--skip-create] [--skip-install] [--no-logs] [--teardown [-y]] [--dry-run]

Runs tpu/create.sh, tpu/install.sh, tpu/launch.sh and tpu/logs.sh (worker 0, until the run ends) in turn.
  --skip-create    the TPU exists already        --skip-install   the workers are installed already
  --no-logs        return once launched (the run goes on; tpu/logs.sh follows it later)
  --teardown       when the run has ended (succeeded or failed), delete the TPU with tpu/teardown.sh,
                   which asks first unless -y. Nothing is deleted if following the log fails (e.g. the
                   connection drops): the run may still be going.
The shared settings (NAME, ZONE, PROJECT, ACCELERATOR_TYPE, RUNTIME_VERSION, QUEUED, SPOT, PREEMPTIBLE,
DRY_RUN, YES) may also come from the environment; see tpu/README.md.
USAGE
}

CREATE=1 INSTALL=1 LOGS=1 TEARDOWN=0
install_args=()
launch_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --skip-create) CREATE=0; shift ;;
    --skip-install) INSTALL=0; shift ;;
    --no-logs) LOGS=0; shift ;;
    --teardown) TEARDOWN=1; shift ;;
    --git | --git=* | --ref | --ref=* | --extras | --extras=*)
      jx_val "$@"; install_args+=("${1%%=*}" "$JX_VAL"); shift "$JX_SHIFT" ;;
    --no-check) install_args+=("$1"); shift ;;
    --config | --config=* | --remote-config | --remote-config=* | --run-dir | --run-dir=* | --set | --set=* | \
      --env | --env=* | --tag | --tag=*)
      jx_val "$@"; launch_args+=("${1%%=*}" "$JX_VAL"); shift "$JX_SHIFT" ;;
    --restart | --shared-run-dir) launch_args+=("$1"); shift ;;
    *) jx_common_flag "$@" || jx_usage_error "unknown argument: $1"; shift "$JX_SHIFT" ;;
  esac
done
jx_require_tpu
[ "$CREATE" = 0 ] || jx_require ACCELERATOR_TYPE --accelerator-type v4-32
[ ${#launch_args[@]} -gt 0 ] || jx_die "nothing to launch: pass --config FILE and --run-dir gs://BUCKET/DIR"
jx_need_gcloud
export NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION QUEUED SPOT PREEMPTIBLE DRY_RUN YES GCLOUD

step() {
  jx_info "== $1"
  "$JX_TPU_DIR/$1" "${@:2}"
}

[ "$CREATE" = 0 ] || step create.sh
[ "$INSTALL" = 0 ] || step install.sh "${install_args[@]}"
step launch.sh "${launch_args[@]}"
[ "$LOGS" = 1 ] || exit 0
rc=0
step logs.sh --until-done || rc=$?
if [ "$rc" != 0 ] && [ "$rc" != 3 ]; then
  jx_die "following the log failed (status $rc); the run may still be going: reattach with" \
    "tpu/logs.sh --name $NAME --zone $ZONE; delete the TPU with tpu/teardown.sh when it is done"
fi
if [ "$DRY_RUN" = 0 ]; then
  if [ "$rc" = 0 ]; then jx_info "the run succeeded"; else jx_info "the run failed (log above)"; fi
fi
[ "$TEARDOWN" = 0 ] || step teardown.sh
exit "$rc"

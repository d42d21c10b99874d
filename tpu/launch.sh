#!/usr/bin/env bash
# Launch 'python -m jaxsae.train' on every worker of a TPU VM or pod slice at once, detached.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
. "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
usage: $JX_PROG [--name NAME] [--zone ZONE] [--project P] (--config FILE|gs://URI | --remote-config PATH)
                --run-dir gs://BUCKET/DIR [--set KEY.PATH=VALUE ...] [--env KEY[=VALUE] ...]
                [--tag TAG] [--restart] [--shared-run-dir] [--accelerator-type TYPE] [--dry-run]

Copies tpu/worker_run.sh and the config to ~/$REMOTE_LAUNCH on every worker, then runs on all workers
simultaneously (gcloud ... ssh --worker=all), from ~/$REMOTE_DIR:

  JAXSAE_DISTRIBUTED=auto ~/$REMOTE_VENV/bin/python -m jaxsae.train --config CONFIG --run-dir RUN_DIR [--set ...]

detached (nohup, own session), so an ssh drop does not stop it. Each worker logs to
~/$REMOTE_LOGS/TAG.log (also ~/$REMOTE_LOGS/latest.log); with a gs:// run dir the logs are copied to
RUN_DIR/logs/<hostname>.log when the run ends. Follow them with tpu/logs.sh.

  --config FILE       a local YAML file, copied to every worker (uncommitted edits included)
  --config gs://URI   fetched on every worker with 'gcloud storage cp'
  --remote-config P   a path already on the workers, relative to ~/$REMOTE_DIR (e.g. configs/x.yaml)
  --run-dir DIR       gs://... for a pod slice: every process writes checkpoints and the store there
                      (a relative path is relative to ~/$REMOTE_DIR on each worker)
  --set K=V           a config override passed on to jaxsae.train; repeatable
  --env K[=V]         an extra environment variable for the run (K alone: its value here); repeatable
  --tag TAG           log name (default: run-<UTC time>)
  --restart           stop a run still alive on the workers first (default: refuse to start)
  --shared-run-dir    accept a non-gs:// run dir on a multi-host slice (a filesystem all workers share)

Environment: NAME, ZONE (required), PROJECT, CONFIG, RUN_DIR, ACCELERATOR_TYPE (to check the run dir
of multi-host slices), DRY_RUN.
USAGE
}

CONFIG=${CONFIG:-}
REMOTE_CONFIG=""
RUN_DIR=${RUN_DIR:-}
TAG=""
RESTART=0
SHARED=0
SETS=()
ENVS=()
while [ $# -gt 0 ]; do
  case $1 in
    --config | --config=*) jx_val "$@"; CONFIG=$JX_VAL; shift "$JX_SHIFT" ;;
    --remote-config | --remote-config=*) jx_val "$@"; REMOTE_CONFIG=$JX_VAL; shift "$JX_SHIFT" ;;
    --run-dir | --run-dir=*) jx_val "$@"; RUN_DIR=$JX_VAL; shift "$JX_SHIFT" ;;
    --set | --set=*) jx_val "$@"; SETS+=("$JX_VAL"); shift "$JX_SHIFT" ;;
    --env | --env=*) jx_val "$@"; ENVS+=("$JX_VAL"); shift "$JX_SHIFT" ;;
    --tag | --tag=*) jx_val "$@"; TAG=$JX_VAL; shift "$JX_SHIFT" ;;
    --restart) RESTART=1; shift ;;
    --shared-run-dir) SHARED=1; shift ;;
    *) jx_common_flag "$@" || jx_usage_error "unknown argument: $1"; shift "$JX_SHIFT" ;;
  esac
done
jx_require_tpu
[ -n "$CONFIG" ] || [ -n "$REMOTE_CONFIG" ] ||
  jx_die "no config: pass --config configs/NAME.yaml (or a gs:// URI), or --remote-config PATH on the workers"
[ -z "$CONFIG" ] || [ -z "$REMOTE_CONFIG" ] || jx_die "pass either --config or --remote-config, not both"
jx_require RUN_DIR --run-dir gs://my-bucket/runs/gemma-2-2b-k40
[[ $CONFIG == gs://* || -z $CONFIG || -f $CONFIG ]] ||
  jx_die "config $CONFIG not found: pass an existing YAML file or a gs:// URI"
for s in "${SETS[@]}"; do
  [[ $s == *=* ]] || jx_usage_error "--set $s: expected KEY.PATH=VALUE"
done

hosts=$(jx_num_hosts)
if [[ $RUN_DIR != gs://* && $SHARED = 0 ]]; then
  if [ -z "$hosts" ]; then
    jx_info "warning: RUN_DIR=$RUN_DIR is not gs://; a multi-host slice needs a run dir every worker shares"
  elif [ "$hosts" -gt 1 ]; then
    jx_die "$ACCELERATOR_TYPE has $hosts hosts: every process writes checkpoints and the store to the run" \
      "dir, so it must be shared: pass --run-dir gs://BUCKET/DIR (or --shared-run-dir for a shared filesystem)"
  fi
fi
jx_need_gcloud
TAG=${TAG:-run-$(date -u +%Y%m%d-%H%M%S)}

# Stage worker_run.sh (and a local config) in a directory named like its destination, copied as a whole.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
stage="$tmp/$REMOTE_LAUNCH"
mkdir "$stage"
cp "$JX_TPU_DIR/worker_run.sh" "$stage/"
pre=""
if [ -n "$REMOTE_CONFIG" ]; then
  cfg=$(jx_q "$REMOTE_CONFIG")
else
  base=$(basename "$CONFIG")
  cfg="\"\$HOME\"/$REMOTE_LAUNCH/$(jx_q "$base")"
  if [[ $CONFIG == gs://* ]]; then
    pre="gcloud storage cp $(jx_q "$CONFIG") $REMOTE_LAUNCH/$(jx_q "$base") && "
  else
    cp "$CONFIG" "$stage/$base"
  fi
fi
jx_gcloud compute tpus tpu-vm scp --recurse "$stage" "$NAME:" --zone="$ZONE" --worker=all

envs=(JAXSAE_DISTRIBUTED=auto)
for e in "${ENVS[@]}"; do
  if [[ $e == *=* ]]; then envs+=("$e"); else envs+=("$e=${!e:-}"); fi
done
train=(-m jaxsae.train --config)
rest=(--run-dir "$RUN_DIR")
for s in "${SETS[@]}"; do rest+=(--set "$s"); done
runner=(bash "$REMOTE_LAUNCH/worker_run.sh" --tag "$TAG" --cwd "$REMOTE_DIR")
[ "$RESTART" = 0 ] || runner+=(--restart)
[[ $RUN_DIR != gs://* ]] || runner+=(--copy-log-to "${RUN_DIR%/}/logs")
remote="cd \"\$HOME\" && $pre$(jx_join "${runner[@]}") -- env $(jx_join "${envs[@]}")"
remote+=" \"\$HOME\"/$REMOTE_VENV/bin/python $(jx_join "${train[@]}") $cfg $(jx_join "${rest[@]}")"
jx_ssh all "$remote"
[ "$DRY_RUN" = 1 ] || jx_info "started $TAG on every worker of $NAME; follow it with: tpu/logs.sh --name $NAME --zone $ZONE"

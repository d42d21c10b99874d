#!/usr/bin/env bash
# Stream the training log of a TPU VM's workers (worker 0 by default).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
. "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
usage: $JX_PROG [--name NAME] [--zone ZONE] [--project P] [--worker N|all] [--tag TAG] [--lines N]
                [--no-follow | --until-done] [--dry-run]

Tails ~/$REMOTE_LOGS/TAG.log (default TAG: latest, the last launch) on worker N (default 0) or on
every worker (--worker=all, each line prefixed with [hostname]). Ctrl-C stops the tail, not the run.

  --lines N      lines of history to print first (default 100)
  --no-follow    print them and exit
  --until-done   follow until the run ends, then print its exit status; exits 0 if the run
                 succeeded, 3 if it failed (any other status: the connection failed)

Environment: NAME, ZONE (required), PROJECT, DRY_RUN.
USAGE
}

WORKER=0
TAG=latest
LINES=100
MODE=follow
while [ $# -gt 0 ]; do
  case $1 in
    --worker | --worker=*) jx_val "$@"; WORKER=$JX_VAL; shift "$JX_SHIFT" ;;
    --tag | --tag=*) jx_val "$@"; TAG=$JX_VAL; shift "$JX_SHIFT" ;;
    --lines | --lines=*) jx_val "$@"; LINES=$JX_VAL; shift "$JX_SHIFT" ;;
    --no-follow) MODE=once; shift ;;
    --until-done) MODE=end; shift ;;
    *) jx_common_flag "$@" || jx_usage_error "unknown argument: $1"; shift "$JX_SHIFT" ;;
  esac
done
jx_require_tpu
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || jx_usage_error "--worker $WORKER: expected a worker index or all"
[[ $LINES =~ ^[0-9]+$ ]] || jx_usage_error "--lines $LINES: expected a number"
jx_need_gcloud

base="$REMOTE_LOGS/$(jx_q "$TAG")"
log="$base.log"
case $MODE in
  once) cmd="tail -n $LINES $log" ;;
  follow) cmd="tail -n $LINES -F $log" ;;
  end) cmd="if [ -f $base.rc ]; then tail -n $LINES $log; else tail --pid=\"\$(cat $base.pid)\" -n $LINES -F $log; fi" ;;
esac
[ "$WORKER" != all ] || cmd="{ $cmd; } | sed -u \"s/^/[\$(hostname)] /\""
if [ "$MODE" = end ]; then
  cmd+="; rc=\$(cat $base.rc 2>/dev/null || echo unknown); echo \"jaxsae run ended on \$(hostname): exit status \$rc\""
  cmd+="; [ \"\$rc\" = 0 ] || exit 3"
fi
cmd="cd \"\$HOME\" && $cmd"
jx_ssh "$WORKER" "$cmd"

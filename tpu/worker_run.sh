#!/usr/bin/env bash
# Runs on a worker: start a command detached from the terminal (it survives an ssh drop), with its
# output in a log file, its pid and finally its exit status next to it. launch.sh copies this script to
# every worker and calls it there; it also works on any machine.
set -euo pipefail

usage() {
  cat <<USAGE
usage: $(basename "$0") --tag TAG [--log-dir DIR] [--cwd DIR] [--copy-log-to URI] [--restart] [--dry-run]
                     -- COMMAND [ARG...]

Starts COMMAND in its own session with nohup, in DIR (--cwd), writing
  LOG_DIR/TAG.log  (stdout and stderr)   LOG_DIR/TAG.pid   LOG_DIR/TAG.rc (exit status, at the end)
and pointing LOG_DIR/latest.{log,pid,rc} at them. Refuses to start while the latest run is alive
unless --restart, which stops it first (its process group, SIGTERM, then SIGKILL after 30 s).
--copy-log-to copies the log to URI/<hostname>.log when COMMAND ends ('gcloud storage cp' for gs://,
else cp). LOG_DIR defaults to ~/jaxsae-logs.
USAGE
}

TAG="" LOG_DIR="$HOME/jaxsae-logs" CWD="" COPY_TO="" RESTART=0 DRY_RUN=${DRY_RUN:-0}
args=("$@")
while [ $# -gt 0 ]; do
  case $1 in
    --tag) TAG=${2-}; shift 2 ;;
    --log-dir) LOG_DIR=${2-}; shift 2 ;;
    --cwd) CWD=${2-}; shift 2 ;;
    --copy-log-to) COPY_TO=${2-}; shift 2 ;;
    --restart) RESTART=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "$(basename "$0"): unknown argument: $1 (run with -h for usage)" >&2; exit 2 ;;
  esac
done
[ -n "$TAG" ] || { echo "$(basename "$0"): --tag is required (e.g. --tag run-1)" >&2; exit 2; }
[ $# -gt 0 ] || { echo "$(basename "$0"): no command after --" >&2; exit 2; }
log="$LOG_DIR/$TAG.log" pidf="$LOG_DIR/$TAG.pid" rcf="$LOG_DIR/$TAG.rc"

if [ "${JX_WORKER_CHILD:-0}" = 1 ]; then
  # The detached child: run the command, record its status, keep a copy of the log.
  [ -z "$CWD" ] || cd "$CWD"
  set +e
  "$@"
  rc=$?
  echo "[$(date -u +%FT%TZ)] exit status $rc"
  if [ -n "$COPY_TO" ]; then
    dest="${COPY_TO%/}/$(hostname).log"
    case $COPY_TO in
      gs://*) gcloud storage cp "$log" "$dest" ;;
      *) mkdir -p "$COPY_TO" && cp "$log" "$dest" ;;
    esac || echo "could not copy the log to $dest"
  fi
  echo "$rc" >"$rcf" # last: a run with an .rc file has finished writing its log
  exit "$rc"
fi

if [ "$DRY_RUN" = 1 ]; then
  printf '+ cd %q && nohup setsid' "${CWD:-.}"
  printf ' %q' "$@"
  printf ' > %q 2>&1 &\n' "$log"
  exit 0
fi

mkdir -p "$LOG_DIR"
if [ -f "$LOG_DIR/latest.pid" ] && [ ! -f "$LOG_DIR/latest.rc" ]; then
  old=$(cat "$LOG_DIR/latest.pid")
  if kill -0 "$old" 2>/dev/null; then
    if [ "$RESTART" = 0 ]; then
      echo "$(hostname): a run is alive (pid $old, log $LOG_DIR/latest.log): pass --restart to stop it first" >&2
      exit 3
    fi
    echo "$(hostname): stopping pid $old" >&2
    kill -TERM -- "-$old" 2>/dev/null || kill -TERM "$old" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$old" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$old" 2>/dev/null || kill -KILL "$old" 2>/dev/null || true
  fi
fi
rm -f "$rcf"
JX_WORKER_CHILD=1 nohup setsid bash "$0" "${args[@]}" >"$log" 2>&1 </dev/null &
echo $! >"$pidf"
for f in log pid rc; do ln -sfn "$TAG.$f" "$LOG_DIR/latest.$f"; done
echo "$(hostname): started pid $! ($*), log $log"

#!/usr/bin/env bash
# Multi-process JAX on GPUs: start one jaxsae.train process per GPU (or per host) on one or several
# hosts, with the explicit distributed settings, and wait for all of them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
. "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
usage: $JX_PROG [--num-processes N | --hosts H1,H2,... [--procs-per-host G]] [--coordinator HOST]
                [--port P] [--log-dir DIR] [--remote-dir DIR] [--python PY] [--dry-run]
                -- --config CONFIG --run-dir RUN_DIR [--set KEY.PATH=VALUE ...]

Starts N processes of 'PY -m jaxsae.train ARGS' (ARGS: everything after --), process i with
  JAXSAE_COORDINATOR=HOST:PORT JAXSAE_NUM_PROCESSES=N JAXSAE_PROCESS_ID=i [CUDA_VISIBLE_DEVICES=j]
which the trainer hands to jax.distributed.initialize. Each process logs to LOG_DIR/proc-i.log;
the script waits for all and, when one fails, stops the others it started and exits with its status.

  --num-processes N   N processes on this machine, one per GPU (CUDA_VISIBLE_DEVICES=0..N-1);
                      default: one per GPU that nvidia-smi lists
  --hosts H1,H2,...   processes on these hosts over ssh (key-based; the repo and its environment at
                      --remote-dir, default this checkout's path), in host order
  --procs-per-host G  with --hosts: 1 (default) = one process per host seeing all its GPUs;
                      G > 1 = one process per GPU (CUDA_VISIBLE_DEVICES=0..G-1 on each host)
  --coordinator HOST  the address process 0 listens on (default: the first host, or localhost)
  --port P            coordinator port (default 12355)
  --log-dir DIR       default logs/gpu-<UTC time>
  --python PY         default: python (the environment's interpreter; on remote hosts as found there)
Environment: DRY_RUN, POLL_SECONDS (how often to check the processes, default 1).

Every process must reach the same run dir: on several hosts use gs://... or a shared filesystem.
Stopping this script stops the processes it started here and the ssh sessions; a remote process can
outlive its session (check with ssh HOST pgrep -af jaxsae.train).
SLURM: skip this script; give each task one GPU and let JAX read the allocation:
  srun --nodes=2 --ntasks-per-node=8 --gpus-per-task=1 \\
    env JAXSAE_DISTRIBUTED=auto python -m jaxsae.train --config CONFIG --run-dir RUN_DIR
USAGE
}

NUM="" HOSTS="" PPH=1 COORD="" PORT=12355 LOG_DIR="" PY=python REMOTE_REPO=$JX_REPO_ROOT
while [ $# -gt 0 ]; do
  case $1 in
    --num-processes | --num-processes=*) jx_val "$@"; NUM=$JX_VAL; shift "$JX_SHIFT" ;;
    --hosts | --hosts=*) jx_val "$@"; HOSTS=$JX_VAL; shift "$JX_SHIFT" ;;
    --procs-per-host | --procs-per-host=*) jx_val "$@"; PPH=$JX_VAL; shift "$JX_SHIFT" ;;
    --coordinator | --coordinator=*) jx_val "$@"; COORD=$JX_VAL; shift "$JX_SHIFT" ;;
    --port | --port=*) jx_val "$@"; PORT=$JX_VAL; shift "$JX_SHIFT" ;;
    --log-dir | --log-dir=*) jx_val "$@"; LOG_DIR=$JX_VAL; shift "$JX_SHIFT" ;;
    --remote-dir | --remote-dir=*) jx_val "$@"; REMOTE_REPO=$JX_VAL; shift "$JX_SHIFT" ;;
    --python | --python=*) jx_val "$@"; PY=$JX_VAL; shift "$JX_SHIFT" ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) jx_usage_error "unknown argument: $1 (the trainer's arguments go after --)" ;;
  esac
done
jx_normalise
[ $# -gt 0 ] || jx_usage_error "no trainer arguments: add -- --config configs/NAME.yaml --run-dir DIR"
[ -z "$NUM" ] || [ -z "$HOSTS" ] || jx_usage_error "pass --num-processes or --hosts, not both"
[[ $PPH =~ ^[1-9][0-9]*$ ]] || jx_usage_error "--procs-per-host $PPH: expected a positive number"
[[ $PORT =~ ^[0-9]+$ ]] || jx_usage_error "--port $PORT: expected a number"

hosts=()
if [ -n "$HOSTS" ]; then
  IFS=, read -ra hosts <<<"$HOSTS"
  [ ${#hosts[@]} -gt 0 ] || jx_usage_error "--hosts is empty"
else
  if [ -z "$NUM" ]; then
    command -v nvidia-smi >/dev/null 2>&1 || jx_die "nvidia-smi not found: pass --num-processes N"
    NUM=$(nvidia-smi -L | grep -c '^GPU') || true
    [ "$NUM" -gt 0 ] || jx_die "nvidia-smi lists no GPU: pass --num-processes N"
  fi
  [[ $NUM =~ ^[1-9][0-9]*$ ]] || jx_usage_error "--num-processes $NUM: expected a positive number"
  hosts=(localhost)
  PPH=$NUM
fi
total=$((${#hosts[@]} * PPH))
COORD=${COORD:-${hosts[0]}}
LOG_DIR=${LOG_DIR:-logs/gpu-$(date -u +%Y%m%d-%H%M%S)}
[ "$DRY_RUN" = 1 ] || mkdir -p "$LOG_DIR"

pids=()
names=()
stop_all() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

id=0
for h in "${hosts[@]}"; do
  for ((j = 0; j < PPH; j++)); do
    cmd=(env "JAXSAE_COORDINATOR=$COORD:$PORT" "JAXSAE_NUM_PROCESSES=$total" "JAXSAE_PROCESS_ID=$id")
    [ "$PPH" = 1 ] && [ -n "$HOSTS" ] || cmd+=("CUDA_VISIBLE_DEVICES=$j")
    cmd+=("$PY" -m jaxsae.train "$@")
    if [ "$h" != localhost ]; then
      cmd=(ssh -o BatchMode=yes "$h" "cd $(jx_q "$REMOTE_REPO") && $(jx_join "${cmd[@]}")")
    fi
    log="$LOG_DIR/proc-$id.log"
    if [ "$DRY_RUN" = 1 ]; then
      printf '+ %s > %s 2>&1 &\n' "$(jx_join "${cmd[@]}")" "$(jx_q "$log")"
    else
      "${cmd[@]}" >"$log" 2>&1 </dev/null &
      pids+=("$!")
      names+=("process $id on $h (log $log)")
      jx_info "started process $id on $h, log $log"
    fi
    id=$((id + 1))
  done
done
[ "$DRY_RUN" = 0 ] || exit 0

# Wait for all; the first failure stops the rest (they would block in a collective otherwise).
while [ ${#pids[@]} -gt 0 ]; do
  for i in "${!pids[@]}"; do
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    unset "pids[$i]"
    if [ "$rc" != 0 ]; then
      jx_info "${names[$i]} failed with status $rc; stopping the others"
      stop_all
      wait || true
      exit "$rc"
    fi
  done
  [ ${#pids[@]} -eq 0 ] || sleep "${POLL_SECONDS:-1}"
done
jx_info "all $total processes finished; logs in $LOG_DIR"

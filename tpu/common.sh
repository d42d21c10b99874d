# shellcheck shell=bash
# shellcheck disable=SC2034  # JX_VAL, JX_SHIFT and the settings are read by the sourcing scripts
# Sourced by the tpu/ scripts: argument and environment parsing, quoting, the gcloud wrapper and the
# --dry-run mode (every gcloud or state-changing command is printed, prefixed with "+ ", instead of run).
#
# Settings, each an environment variable or the matching flag (the flag wins):
#   NAME              --name              TPU VM / queued resource name (required)
#   ZONE              --zone              e.g. us-central2-b (required)
#   PROJECT           --project           GCP project; default: gcloud's configured project
#   ACCELERATOR_TYPE  --accelerator-type  e.g. v5litepod-8, v4-32 (required to create)
#   RUNTIME_VERSION   --runtime-version   default derived from ACCELERATOR_TYPE
#   QUEUED=1          --queued            use a queued resource instead of a direct create
#   SPOT=1            --spot              spot capacity
#   PREEMPTIBLE=1     --preemptible       legacy preemptible TPU VM (direct create only)
#   DRY_RUN=1         --dry-run           print the commands instead of running them
#   YES=1             -y, --yes           no confirmation prompt (teardown)
#   GCLOUD                                the gcloud executable (default: gcloud)

if [ "${BASH_VERSINFO[0]}" -lt 4 ] || { [ "${BASH_VERSINFO[0]}" -eq 4 ] && [ "${BASH_VERSINFO[1]}" -lt 4 ]; }; then
  echo "$0: needs bash >= 4.4, this is $BASH_VERSION (macOS: 'brew install bash', then run it with that bash)" >&2
  exit 1
fi

JX_TPU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
JX_REPO_ROOT=$(cd "$JX_TPU_DIR/.." && pwd)
JX_PROG=$(basename "$0")
export JX_TPU_DIR JX_REPO_ROOT

: "${NAME:=}" "${ZONE:=}" "${PROJECT:=}" "${ACCELERATOR_TYPE:=}" "${RUNTIME_VERSION:=}"
: "${QUEUED:=0}" "${SPOT:=0}" "${PREEMPTIBLE:=0}" "${DRY_RUN:=0}" "${YES:=0}"
: "${GCLOUD:=gcloud}"
# Layout on every worker, relative to the worker user's home directory.
: "${REMOTE_DIR:=jaxsae}" "${REMOTE_VENV:=jaxsae-venv}" "${REMOTE_LOGS:=jaxsae-logs}"
: "${REMOTE_LAUNCH:=jaxsae-launch}"

jx_info() { printf '%s: %s\n' "$JX_PROG" "$*" >&2; }
jx_die() {
  printf '%s: error: %s\n' "$JX_PROG" "$*" >&2
  exit 1
}
jx_usage_error() {
  printf "%s: %s (run '%s -h' for usage)\n" "$JX_PROG" "$*" "$JX_PROG" >&2
  exit 2
}

# jx_q ARG: ARG quoted for a POSIX shell; plain words stay bare, --flag=value quotes only the value.
jx_q() {
  local s=$1 prefix=""
  if [[ $s =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then
    printf '%s' "$s"
    return
  fi
  if [[ $s =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    prefix=${BASH_REMATCH[1]}
    s=${BASH_REMATCH[2]}
  fi
  printf "%s'%s'" "$prefix" "${s//\'/\'\\\'\'}"
}

# jx_join ARG...: the arguments as one shell command line.
jx_join() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(jx_q "$a")"
  done
  printf '%s' "$out"
}

# jx_run CMD...: run a command, or in dry-run mode print it on stdout.
jx_run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+ %s\n' "$(jx_join "$@")"
    return 0
  fi
  jx_info "+ $(jx_join "$@")"
  "$@"
}

jx_is_true() { case ${1,,} in 1 | true | yes | on) return 0 ;; *) return 1 ;; esac; }

jx_need_gcloud() {
  [ "$DRY_RUN" = 1 ] && return 0
  command -v "$GCLOUD" >/dev/null 2>&1 || jx_die "'$GCLOUD' not found: install the Google Cloud CLI" \
    "(https://cloud.google.com/sdk/docs/install), run 'gcloud auth login', or set GCLOUD to its path;" \
    "--dry-run prints the commands without it"
}

# jx_gcloud ARGS...: gcloud with --project added when PROJECT is set.
jx_gcloud() {
  local extra=()
  [ -n "$PROJECT" ] && extra=(--project="$PROJECT")
  jx_run "$GCLOUD" "$@" "${extra[@]}"
}

# jx_require VAR FLAG EXAMPLE: stop with the fix when a required setting is empty.
jx_require() {
  [ -n "${!1:-}" ] || jx_die "$1 is not set: pass $2 or export $1 (e.g. $1=$3)"
}

# jx_val "$@": the value of "--flag value" or "--flag=value" in JX_VAL; JX_SHIFT = arguments used.
jx_val() {
  if [[ $1 == --*=* ]]; then
    JX_VAL=${1#*=}
    JX_SHIFT=1
  else
    [ $# -ge 2 ] || jx_usage_error "$1 needs a value"
    JX_VAL=$2
    JX_SHIFT=2
  fi
}

# jx_common_flag "$@": parse one shared flag; returns 1 (JX_SHIFT=0) when $1 is not one.
# Each script defines usage() before calling it.
jx_common_flag() {
  JX_SHIFT=1
  case $1 in
    --name | --name=*) jx_val "$@"; NAME=$JX_VAL ;;
    --zone | --zone=*) jx_val "$@"; ZONE=$JX_VAL ;;
    --project | --project=*) jx_val "$@"; PROJECT=$JX_VAL ;;
    --accelerator-type | --accelerator-type=*) jx_val "$@"; ACCELERATOR_TYPE=$JX_VAL ;;
    --runtime-version | --runtime-version=*) jx_val "$@"; RUNTIME_VERSION=$JX_VAL ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -y | --yes) YES=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      JX_SHIFT=0
      return 1
      ;;
  esac
}

# Normalise the boolean settings to 0/1 so that scripts can test "= 1".
# Normalised settings plus the two every TPU command needs.
jx_require_tpu() {
  jx_normalise
  jx_require NAME --name my-tpu
  jx_require ZONE --zone us-central2-b
}

jx_normalise() {
  local v
  for v in QUEUED SPOT PREEMPTIBLE DRY_RUN YES; do
    if jx_is_true "${!v}"; then printf -v "$v" 1; else printf -v "$v" 0; fi
  done
}

# The runtime (software) version Google recommends for JAX on each TPU generation.
jx_default_runtime() {
  case $ACCELERATOR_TYPE in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) jx_die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=$ACCELERATOR_TYPE: set RUNTIME_VERSION" \
      "(see 'gcloud compute tpus tpu-vm versions list --zone=ZONE')" ;;
  esac
}

# Number of TPU VM hosts (workers) of ACCELERATOR_TYPE; empty when unknown.
# v2/v3/v4/v5p count TensorCores (8 per host); v5e/v6e count chips (up to 8 on one host, else 4 per host).
jx_num_hosts() {
  local n=${ACCELERATOR_TYPE##*-}
  [[ $n =~ ^[0-9]+$ ]] || return 0
  case $ACCELERATOR_TYPE in
    v2-* | v3-* | v4-* | v5p-*) echo $(((n + 7) / 8)) ;;
    v5litepod-* | v5e-* | v6e-*) if [ "$n" -le 8 ]; then echo 1; else echo $((n / 4)); fi ;;
  esac
}

# jx_ssh WORKER COMMAND: run COMMAND (a shell string) on one worker or on "all" of them at once.
jx_ssh() {
  jx_gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker="$1" --command="$2"
}

# jx_scp_all SRC... DEST: copy local files to DEST (relative to the home directory) on every worker.
jx_scp_all() {
  local n=$# dest=${!#}
  jx_gcloud compute tpus tpu-vm scp "${@:1:n-1}" "$NAME:$dest" --zone="$ZONE" --worker=all
}

# jx_confirm QUESTION: yes with -y, else ask on the terminal; anything but y/yes (or no input) is no.
jx_confirm() {
  [ "$YES" = 1 ] && return 0
  local answer=""
  printf '%s [y/N] ' "$1" >&2
  read -r answer || true
  [[ ${answer,,} == y || ${answer,,} == yes ]]
}

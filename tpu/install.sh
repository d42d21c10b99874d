#!/usr/bin/env bash
# Install jaxsae and JAX for TPU (libtpu) on every worker of a TPU VM or pod slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
. "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
usage: $JX_PROG [--name NAME] [--zone ZONE] [--project P] [--ref REF | --git URL [--ref REF]]
                [--extras hub] [--no-check] [--dry-run]

Puts the code in ~/$REMOTE_DIR on every worker (--worker=all) and installs it into the virtual
environment ~/$REMOTE_VENV with 'pip install -e ".[EXTRAS]" "jax[tpu]"'.

  (default)     ship 'git archive REF' of this checkout (REF default HEAD: commit what you want to run;
                uncommitted changes are not shipped) as a tarball copied to every worker
  --git URL     clone URL on every worker instead and check out --ref (default: the remote's HEAD)
  --extras E    pip extras to install (default: hub, for Hugging Face datasets; '' for none)
  --no-check    skip the final check that every worker sees its TPU chips through JAX

When HF_TOKEN is set here it is copied to ~/.cache/huggingface/token on every worker (gated models
such as Gemma need it); it never appears on a command line.

Environment: NAME, ZONE (required), PROJECT, REF, GIT_URL, EXTRAS, DRY_RUN,
JAX_TPU_FIND_LINKS (extra pip index page for libtpu; default the JAX release page, '' for none).
USAGE
}

REF=${REF:-}
GIT_URL=${GIT_URL:-}
EXTRAS=${EXTRAS-hub}
CHECK=1
JAX_TPU_FIND_LINKS=${JAX_TPU_FIND_LINKS-https://storage.googleapis.com/jax-releases/libtpu_releases.html}
while [ $# -gt 0 ]; do
  case $1 in
    --ref | --ref=*) jx_val "$@"; REF=$JX_VAL; shift "$JX_SHIFT" ;;
    --git | --git=*) jx_val "$@"; GIT_URL=$JX_VAL; shift "$JX_SHIFT" ;;
    --extras | --extras=*) jx_val "$@"; EXTRAS=$JX_VAL; shift "$JX_SHIFT" ;;
    --no-check) CHECK=0; shift ;;
    *) jx_common_flag "$@" || jx_usage_error "unknown argument: $1"; shift "$JX_SHIFT" ;;
  esac
done
jx_require_tpu
jx_need_gcloud

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
upload=()

if [ -z "$GIT_URL" ]; then
  REF=${REF:-HEAD}
  git -C "$JX_REPO_ROOT" rev-parse --verify --quiet "$REF^{commit}" >/dev/null ||
    jx_die "REF=$REF is not a commit of a git checkout at $JX_REPO_ROOT: pass --ref with a branch, tag or" \
      "commit, or --git URL to clone on the workers"
  if [ -n "$(git -C "$JX_REPO_ROOT" status --porcelain --untracked-files=no)" ]; then
    jx_info "warning: uncommitted changes are not shipped; commit them to run them"
  fi
  jx_run git -C "$JX_REPO_ROOT" archive --format=tar.gz -o "$tmp/jaxsae.tar.gz" "$REF"
  upload+=("$tmp/jaxsae.tar.gz")
  fetch="rm -rf $REMOTE_DIR.new && mkdir $REMOTE_DIR.new && tar -xzf jaxsae.tar.gz -C $REMOTE_DIR.new"
  fetch+=" && rm -rf $REMOTE_DIR && mv $REMOTE_DIR.new $REMOTE_DIR && rm jaxsae.tar.gz"
else
  fetch="{ [ -d $REMOTE_DIR/.git ] || { rm -rf $REMOTE_DIR && git clone -q $(jx_q "$GIT_URL") $REMOTE_DIR; }; }"
  fetch+=" && git -C $REMOTE_DIR fetch -q --tags origin"
  if [ -n "$REF" ]; then
    fetch+=" && git -C $REMOTE_DIR checkout -q --detach $(jx_q "$REF")"
  else
    fetch+=" && git -C $REMOTE_DIR checkout -q --detach origin/HEAD"
  fi
fi

if [ -n "${HF_TOKEN:-}" ]; then
  (umask 077 && printf '%s' "$HF_TOKEN" >"$tmp/jaxsae-hf-token")
  upload+=("$tmp/jaxsae-hf-token")
fi
[ ${#upload[@]} -eq 0 ] || jx_scp_all "${upload[@]}" ""

spec="./$REMOTE_DIR"
[ -z "$EXTRAS" ] || spec+="[$EXTRAS]"
links=()
[ -z "$JAX_TPU_FIND_LINKS" ] || links=(-f "$JAX_TPU_FIND_LINKS")
pip="$REMOTE_VENV/bin/pip"
steps=(
  "set -e"
  "cd \"\$HOME\""
  "$fetch"
  "if [ -f jaxsae-hf-token ]; then mkdir -p .cache/huggingface && mv jaxsae-hf-token .cache/huggingface/token && chmod 600 .cache/huggingface/token; fi"
  "[ -x $REMOTE_VENV/bin/python ] || python3 -m venv $REMOTE_VENV || { sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv $REMOTE_VENV; }"
  "$pip install -q --upgrade pip"
  "$(jx_join "$pip" install -q -e "$spec" "jax[tpu]" "${links[@]}")"
)
[ "$CHECK" = 0 ] || steps+=("$REMOTE_VENV/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)'")
remote=$(printf '%s\n' "${steps[@]}")
jx_ssh all "$remote"

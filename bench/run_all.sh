#!/usr/bin/env bash
# Every bench on the current JAX device, one markdown file: bench/results-<device>-<date>.md
#   bash bench/run_all.sh            # each bench at its default (real) sizes
#   bash bench/run_all.sh --quick    # the smallest sizes, to check that everything runs (ratios mean
#                                    # nothing; writes bench/results-<device>-<date>-quick.md)
#   bash bench/run_all.sh --wait     # let the benches that can, wait for a quiet machine (<= 15 min each)
# An existing results file is never overwritten (-2, -3, ... are appended).
# Run it with the virtualenv active (from anywhere: it works in the repository root); PYTHON=... picks
# another interpreter.
# The file starts with the device, platform, jax/jaxlib (and torch) versions, CPU count and date, then
# a table of every ratio the benches print, then each bench's own output. A bench that fails is
# recorded with its exit status and the others still run; the script exits 1 if any failed.
set -euo pipefail

usage() { sed -n '2,12s/^# \{0,1\}//p' "$0"; }

quick=0
wait_flag=(--no-wait)
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1 ;;
    --wait) wait_flag=() ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_all.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.."
py=${PYTHON:-python}
# bench this checkout, whatever jaxsae the interpreter has installed
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

work=$(mktemp -d)  # logs and bench_reader's store (default size: ~3 GB; TMPDIR picks the disk)
trap 'rm -rf "$work"' EXIT

# The benches, in order: name, then arguments (default sizes, or the smallest ones with --quick).
# The ones with --no-wait get it unless --wait: on a lent accelerator, waiting up to 15 min per bench
# for "a quiet machine" costs more than it protects; each table is still followed by the load of other
# processes during the timing ("NOT QUIET" above 5 %).
if [ "$quick" = 1 ]; then
  mse=(--d-model 64 --d-sae 256 --k 8 --batch 128 --steps 2 --rounds 1 --pool 2 --matmul-n 256)
  collect=(--batch 2 --seq 32 --layer 1 --iters 1 --rounds 1 --hidden 64 --layers 2 --heads 2
           --intermediate 128 --vocab 512)
  reader=(--rows 32768 --d-model 64 --batch-size 256 --batches 20 --window-mb 4)
  finetune=(--batch 2 --seq 16 --d-sae 128 --k 4 --steps 2)
  sweep=(--n 2 --d-sae 128 --batch-seqs 2 --seq 16 --mse-batch 128 --iters 1 --rounds 1)
else
  mse=() collect=() reader=() finetune=() sweep=()
fi
reader+=(--path "$work/store")

date=$(date +%Y-%m-%d)
# the header (written to $work/header.md); prints the device kind as a file-name slug
slug=$("$py" - "$work/header.md" "$quick" <<'EOF'
import os, platform, subprocess, sys, time

import jax
import jaxlib

out, quick = sys.argv[1], sys.argv[2] == "1"
dev = jax.devices()[0]
cpu = platform.processor() or platform.machine()
try:
    with open("/proc/cpuinfo") as fh:
        cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), cpu)
except OSError:
    pass
try:
    cores = len(os.sched_getaffinity(0))
except AttributeError:
    cores = os.cpu_count()
try:
    import torch
    tv = f"{torch.__version__} (cuda available: {torch.cuda.is_available()}; float32 matmul precision " \
         f"{torch.get_float32_matmul_precision()})"
except ImportError:
    tv = "not installed (bench_mse_step and bench_collect need it)"
git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
slug = "".join(c if c.isalnum() else "-" for c in dev.device_kind.lower()).strip("-") or dev.platform
lines = [
    f"# Bench results: {dev.device_kind}, {time.strftime('%Y-%m-%d')}" + (" (--quick)" if quick else ""),
    "",
    "| | |",
    "|---|---|",
    f"| device | {dev.device_kind} x{jax.device_count()} |",
    f"| platform | {dev.platform} |",
    f"| jax / jaxlib | {jax.__version__} / {jaxlib.__version__} |",
    f"| jax float32 matmul precision | {jax.config.jax_default_matmul_precision or 'default'} |",
    f"| torch | {tv} |",
    f"| host | {cpu}, {cores} CPUs |",
    f"| date | {time.strftime('%Y-%m-%d %H:%M %Z')} |",
    f"| jaxsae | {git or 'unknown'} |",
    "",
]
if quick:
    lines += ["**--quick: the smallest sizes, to check the script runs. These ratios mean nothing.**", ""]
with open(out, "w") as fh:
    fh.write("\n".join(lines))
print(slug)
EOF
)
# results-<device>-<date>[-<JAX_DEFAULT_MATMUL_PRECISION>][-quick][-<n>].md: never overwrite a result
stem=bench/results-$slug-$date${JAX_DEFAULT_MATMUL_PRECISION:+-$JAX_DEFAULT_MATMUL_PRECISION}
stem=$stem$([ "$quick" = 1 ] && echo -quick || true)
result=$stem.md
n=2
while [ -e "$result" ]; do result=$stem-$n.md; n=$((n + 1)); done

failed=0
runs=()
run() {  # run NAME ARGS...: bench/NAME.py ARGS, stdout+stderr to $work/NAME.log, status and time to .meta
  local name=$1; shift
  local t0 rc=0
  echo "run_all: $name $*" >&2
  t0=$(date +%s)
  "$py" "bench/$name.py" "$@" >"$work/$name.log" 2>"$work/$name.err" || rc=$?
  printf '%s\t%s\t%s\n' "$rc" "$(( $(date +%s) - t0 ))" "$*" >"$work/$name.meta"
  if [ "$rc" != 0 ]; then
    failed=1
    echo "run_all: $name FAILED (exit $rc); last lines of its stderr:" >&2
    tail -n 5 "$work/$name.err" >&2
  fi
  runs+=("$name")
}

run bench_mse_step "${mse[@]}" "${wait_flag[@]}"
run bench_collect "${collect[@]}" "${wait_flag[@]}"
run bench_reader "${reader[@]}"
run bench_finetune "${finetune[@]}"
run bench_sweep "${sweep[@]}" "${wait_flag[@]}"

"$py" - "$work" "$result" "${runs[@]}" <<'EOF'
import re, sys
from pathlib import Path

work, result, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
# the file is meant to be committed: no temporary or checkout paths in it
clean = lambda t: t.replace(str(work), "$TMP").replace(str(Path.cwd()) + "/", "")
logs = {n: clean((work / f"{n}.log").read_text()) for n in names}
meta = {n: clean((work / f"{n}.meta").read_text()).rstrip("\n").split("\t", 2) for n in names}
ratios = []  # (bench, ratio, value, goal)


def cols(log, first):
    """The columns of the aligned-table row whose first column is `first` (common.table's format)."""
    for line in log.splitlines():
        c = re.split(r"\s{2,}", line.strip())
        if c and c[0] == first:
            return c
    return None


log = logs.get("bench_mse_step", "")
for row, what, goal in (("jaxsae", "jaxsae MSE step (default `sae.decode: auto`) / torch step", "≥ 1.5x"),
                        ("jaxsae, sae.decode=dense", "jaxsae MSE step, `sae.decode: dense` / torch step", "")):
    c = cols(log, row)
    if c:
        ratios.append(("bench_mse_step", what, c[3], goal))
m = re.search(r"jaxsae at (\d+%) of measured matmul rate", log)
if m:
    ratios.append(("bench_mse_step", "jaxsae MSE step, % of the measured matmul rate", m.group(1), "≥ 50%"))

for line in logs.get("bench_collect", "").splitlines():
    m = re.match(r"\s+(.+?): full \(usual\) (\S+), base model (\S+), truncated (\S+);", line)
    if m:
        model, full, base, trunc = m.groups()
        ratios += [("bench_collect", f"{model}: jaxsae residual / torch truncated at the layer", trunc, "≥ 1.3x"),
                   ("bench_collect", f"{model}: jaxsae residual / torch full forward (usual)", full, ""),
                   ("bench_collect", f"{model}: jaxsae residual / torch base model", base, "")]

log = logs.get("bench_reader", "")
seq = re.search(r"sequential read: ([\d,]+) rows/s", log)
rd = re.search(r"then ([\d,]+) rows/s", log)
if seq and rd:
    s, r = (float(x.group(1).replace(",", "")) for x in (seq, rd))
    ratios.append(("bench_reader", f"ShuffledReader / sequential reads ({r:,.0f} / {s:,.0f} rows/s)",
                   f"{r / s:.2f}x", ""))

log = logs.get("bench_finetune", "")
m = re.search(r"FLOP-count ceiling,? (\S+)\)", log)
ceiling = m.group(1) if m else "?"
for pat, what, goal in ((r"fused speed-up over naive:\s+(\S+)", "fused KL+MSE step: naive / fused time",
                         f"at the FLOP-count ceiling ({ceiling})"),
                        (r"fused / floor:\s+(\S+)", "fused KL+MSE step / LM-forward floor without the SAE (time)", ""),
                        (r"fused / \(floor \+ mse\):\s+(\S+)", "fused KL+MSE step / (LM floor + the SAE's MSE step) (time)",
                         "≤ 1.10x"),
                        (r"fine-tune cost per token:\s+(\S+)", "fused KL+MSE step / MSE step (time per token)", "")):
    m = re.search(pat, log)
    if m:
        ratios.append(("bench_finetune", what, m.group(1), goal))

for line in logs.get("bench_sweep", "").splitlines():
    c = [x.strip() for x in line.strip().strip("|").split("|")]
    if line.startswith("|") and len(c) == 6 and c[3].endswith("x"):
        ratios.append(("bench_sweep", f"{c[0]}: one sweep program / N single programs (time; FLOPs {c[4]})",
                       c[3], c[5]))

out = [(work / "header.md").read_text(), "## Ratios", "",
       "Each ratio is measured against its reference in the same run (speed-ups: > 1 is jaxsae faster; "
       "time ratios: < 1 is jaxsae faster). Goals are the project's.", "",
       "| bench | ratio | value | goal |", "|---|---|---:|---|"]
out += [f"| `{b}` | {w} | {v} | {g} |" for b, w, v, g in ratios]
out += ["", "## Runs", "", "| bench | arguments | exit | wall s | load of other processes |", "|---|---|---:|---:|---|"]
for n in names:
    rc, sec, args = meta[n]
    load = re.findall(r"other processes used (\d+%)", logs[n])
    quiet = "NOT QUIET" if "NOT QUIET" in logs[n] else ""
    out.append(f"| `{n}` | `{args or '(defaults)'}` | {rc} | {sec} | {', '.join(load) or 'not measured'} {quiet} |")
for n in names:
    out += ["", f"## `{n}`", ""]
    text = logs[n].rstrip("\n")
    if meta[n][0] != "0":
        err = clean((work / f"{n}.err").read_text()).rstrip("\n").splitlines()[-20:]
        text += f"\n\nFAILED (exit {meta[n][0]}); last lines of stderr:\n" + "\n".join(err)
    # the benches' markdown tables (lines starting with |) stay markdown; everything else is fenced
    block, fenced = [], []
    for line in text.splitlines() + [None]:
        is_md = line is not None and line.startswith("|")
        if fenced and (line is None or is_md):
            while fenced and not fenced[-1].strip():
                fenced.pop()
            while fenced and not fenced[0].strip():
                fenced.pop(0)
            if fenced:
                block += ([""] if block and block[-1] else []) + ["```text", *fenced, "```", ""]
            fenced = []
        if line is None:
            break
        (block if is_md else fenced).append(line)
    while block and not block[-1]:
        block.pop()
    out += block
result.write_text("\n".join(out).rstrip("\n") + "\n")
print(f"run_all: wrote {result}", file=sys.stderr)
EOF
exit "$failed"

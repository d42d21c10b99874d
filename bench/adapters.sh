#!/usr/bin/env bash
# The paper's adapter comparisons on the demo model, reusing a finished demo run (MSE + fine-tune
# checkpoints and the store), so each method costs only its 500k-token adapter phase.
#   bench/adapters.sh NAME [--set key=value ...]     e.g. bench/adapters.sh sae_lora_r2 --set adapter.kind=sae_lora ...
# BASE (default runs/demo) is the finished demo run; results go to runs/adapters/NAME.
# bench/adapters_table.py then prints the table (bench/adapters.md).
set -euo pipefail
name=$1; shift
base=${BASE:-runs/demo}
dir=runs/adapters/$name
mkdir -p "$dir/checkpoints"
for phase in mse finetune; do
  [ -d "$dir/checkpoints/$phase" ] || cp -r "$base/checkpoints/$phase" "$dir/checkpoints/$phase"
done
exec python -m jaxsae.train --config configs/demo-adapters.yaml --run-dir "$dir" \
  --set "store.path=$base/store" "$@"

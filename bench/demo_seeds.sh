#!/usr/bin/env bash
# The demo's headline over three seeds: configs/demo.yaml (mse, control, finetune) with mse.seed and
# finetune.seed (the control's too) set to 0, 1, 2 over one shared store; prints every row's mean ± sd.
#   bash bench/demo_seeds.sh [OUT_DIR]        (default runs/demo-seeds; ~4 minutes a seed on 2 cores)
#   CONFIG=configs/demo-relu.yaml bash bench/demo_seeds.sh runs/demo-relu-seeds    (another demo config)
#   SET="--set store.mode=stream" bash bench/demo_seeds.sh runs/demo-stream-seeds   (extra settings)
#   SEEDS="1 2" ...                                    (only those seeds; the report still reads s0..s2)
set -euo pipefail
out=${1:-runs/demo-seeds}
config=${CONFIG:-configs/demo.yaml}
for s in ${SEEDS:-0 1 2}; do
  # shellcheck disable=SC2086  # SET is a list of arguments
  python -m jaxsae.train --config "$config" --run-dir "$out/s$s" --set "store.path=$out/store" \
    --set "mse.seed=$s" --set "finetune.seed=$s" ${SET:-}
done
python -m jaxsae.report "$out/s0" "$out/s1" "$out/s2" | tee "$out/seeds.md"

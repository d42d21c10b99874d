#!/usr/bin/env bash
# The demo's headline over three seeds: configs/demo.yaml (mse, control, finetune) with mse.seed and
# finetune.seed (the control's too) set to 0, 1, 2 over one shared store; prints every row's mean ± sd.
#   bash bench/demo_seeds.sh [OUT_DIR]        (default runs/demo-seeds; ~4 minutes a seed on 2 cores)
#   CONFIG=configs/demo-relu.yaml bash bench/demo_seeds.sh runs/demo-relu-seeds    (another demo config)
set -euo pipefail
out=${1:-runs/demo-seeds}
config=${CONFIG:-configs/demo.yaml}
for s in 0 1 2; do
  python -m jaxsae.train --config "$config" --run-dir "$out/s$s" --set "store.path=$out/store" \
    --set "mse.seed=$s" --set "finetune.seed=$s"
done
python -m jaxsae.report "$out/s0" "$out/s1" "$out/s2" | tee "$out/seeds.md"

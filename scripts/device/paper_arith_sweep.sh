#!/usr/bin/env bash
# The Mamba-3 paper's modular arithmetic without brackets (Table 5b, issue 16) on one H200, as RESULTS.md "GPU 7"
# ran it: paper-state-tracking.yaml's arithmetic group, the staircase 3, 5, ..., 31 at 1,000 steps per stage, then
# 2-3 stages of 1,000 steps each at 40, 60, 80, 120 and 160 (23,000 steps, batch 256), Mamba-3 at 2 lrs x 2 seeds,
# standard RoPE and Mamba-2 style at 2 lrs: 8 runs sharing the GPU (gpus_per_worker 0.125). GPU 7 wrote the same
# schedule with repeated stages (40, 40, 60, 60, ... at 1,000 steps each): the same length at every step, so the
# same batches. About 1,250 s of GPU time, so three device calls on one warm machine, each continuing the sweep (scripts/device/sweep_calls.sh):
#
#   BUDGET_S=470 bash scripts/device/paper_arith_sweep.sh [DIR]   # call 1 (after unpacking the training stack)
#   BUDGET_S=545 bash scripts/device/paper_arith_sweep.sh [DIR]   # calls 2, 3, ... until it exits 0
#
# Knobs (environment): BRACKETS=true runs the with-brackets column instead (same schedule and rows);
# M3_LRS / OTHER_LRS replace the lr lists of the Mamba-3 row and of the standard-RoPE and Mamba-2 rows
# (GPU 7: "7.2e-4, 1.39e-3" and "1.39e-3, 2.68e-3"; the paper sweeps 1e-4 to 1e-2), M3_SEEDS the Mamba-3 row's
# seeds ("0, 1"); M3_BRACKETS=true gives the Mamba-3 row brackets while the other rows keep BRACKETS;
# OTHER_LAYOUTS replaces the other rows ("m3_std m3_std m3_std, m2 m2 m2"; m2c: Mamba-2 with its short convolution).
#
# then, with DIR/mlruns.db brought back:
#   hybridlab compare paper-state-tracking --uri sqlite:///DIR/mlruns.db --metric scaled_acc \
#     --best-of train.lr --select eval/modarith/len_256/scaled_acc
set -uo pipefail
DIR=${1:-/tmp/paper-arith}
# the training stack as ../shared/device/README.md unpacks it (a new device call does not keep the exports)
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH; fi
python3 -c "import hybridlab" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null
group() { echo "data.task: modarith, data.target: final, data.modulus: 5, data.bracket_style: full, data.brackets: $1, model.d_model: 64"; }
BRACKETS=${BRACKETS:-false}
SWEEP="sweep=[{$(group "${M3_BRACKETS:-$BRACKETS}"), model.layout: m3 m3 m3, train.lr: [${M3_LRS:-7.2e-4, 1.39e-3}], train.seed: [${M3_SEEDS:-0, 1}]},
              {$(group "$BRACKETS"), model.layout: [${OTHER_LAYOUTS:-m3_std m3_std m3_std, m2 m2 m2}], train.lr: [${OTHER_LRS:-1.39e-3, 2.68e-3}]}]"
exec bash "$(dirname "$0")/sweep_calls.sh" "$DIR" jobs/recipes/paper-state-tracking.yaml --set "$SWEEP" \
  --set 'data.curriculum.max_len=[3,5,7,9,11,13,15,19,23,27,31,40,60,80,120,160]' \
  --set 'data.curriculum.steps_per_stage=[1000,1000,1000,1000,1000,1000,1000,1000,1000,1000,1000,2000,2000,2000,3000,3000]' \
  --set train.steps=23000 --set train.warmup=500 \
  --set train.eval_every=2000 --set train.checkpoint_every=1000 \
  --set resources.gpus_per_worker=0.125 --set resources.concurrent_runs=8 --set resources.cpus_per_worker=1

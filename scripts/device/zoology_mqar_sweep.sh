#!/usr/bin/env bash
# Zoology's Figure 2 (issue 16) on one H200, one sequence length at a time: jobs/recipes/zoology-mqar.yaml at
# (seq_len, kv pairs, batch) = (64, 4, 512), (128, 8, 512), (256, 16, 256) or (512, 64, 128), its 4 d_model x
# 4 mixers x $LRS, 16 runs per learning rate sharing the GPU (resources.concurrent_runs, fractional gpus_per_worker),
# eager, bf16 autocast over fp32 parameters, early stop at 0.99 validation accuracy. Each length is its own
# sweep in its own folder, continued across device calls by scripts/device/sweep_calls.sh (--resume-sweep):
#
#   BUDGET_S=480 bash scripts/device/zoology_mqar_sweep.sh 64 [DIR]   # again on the same DIR until it exits 0
#
# Knobs (environment): LRS (default "4.64e-4, 2.15e-3", two of Zoology's logspace(-4, -2, 4)); EPOCHS: training
# sequences per run in units of Zoology's 100k (default 10; Zoology: up to 64 passes over 100k fixed ones, with
# the same early stop; here every sequence is fresh); D_MODELS (default "64, 128, 256, 512"; one attention head
# per 64 channels, the recipe's choice: Zoology has 1); LAYOUTS (default "attn attn, m2 m2, m3 m3, m3r4 m3r4");
# CONCURRENT (runs at once; default 16 at length 64, else 12); COMPILE (train.compile; default false, eager, as
# every sweep in RESULTS.md ran: `true` compiles each run's step once, 1.6x the steps per second of eager for
# these models in BENCHMARKS.md's plain loop, worth it for runs of 10^4 steps; not yet run through this script).
#
# Arguments after DIR go to `hybridlab run` as they are (more --set). The final eval is 3,000 sequences (in
# batches of 125 at length 512, so one fits in 1/12 of the GPU).
#
# then, with DIR/mlruns.db brought back (one store per length; each length's runs are their own figure):
#   hybridlab compare zoology-mqar --uri sqlite:///DIR/mlruns.db --x model.d_model --best-of train.lr \
#     --select best/eval/mqar/len_64/acc
set -uo pipefail
L=${1:?usage: zoology_mqar_sweep.sh SEQ_LEN [DIR]  (SEQ_LEN: 64, 128, 256 or 512)}
DIR=${2:-/tmp/zoology-mqar-$L}
case "$L" in
  64) KV=4 B=512 EB=250 ;; 128) KV=8 B=512 EB=250 ;; 256) KV=16 B=256 EB=250 ;; 512) KV=64 B=128 EB=125 ;;
  *) echo "zoology_mqar_sweep.sh: SEQ_LEN must be 64, 128, 256 or 512 (Zoology's Figure 2); got '$L'" >&2; exit 2 ;;
esac
EPOCHS=${EPOCHS:-10}
case "$EPOCHS" in ''|*[!0-9]*) echo "zoology_mqar_sweep.sh: EPOCHS must be a positive integer; got '$EPOCHS'" >&2; exit 2 ;; esac
STEPS=$(( (EPOCHS * 100000 + B - 1) / B ))
# 1/16 of the GPU holds the largest model (d_model 512, MIMO) at 32k tokens a step, 1/12 at 64k (the others)
N=${CONCURRENT:-$([ "$L" = 64 ] && echo 16 || echo 12)}
cd "$(dirname "$0")/../.."
# the training stack as ../shared/device/README.md unpacks it (a new device call does not keep the exports)
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH; fi
python3 -c "import hybridlab" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null
D_MODELS=${D_MODELS:-64, 128, 256, 512}
HEADS=$(python3 -c "print(', '.join(str(max(1, int(d) // 64)) for d in '$D_MODELS'.split(',')))") || exit 2
SWEEP="sweep={zip: [{model.d_model: [$D_MODELS], model.blocks.attn.heads: [$HEADS]}],
              model.layout: [${LAYOUTS:-attn attn, m2 m2, m3 m3, m3r4 m3r4}], train.lr: [${LRS:-4.64e-4, 2.15e-3}]}"
exec bash scripts/device/sweep_calls.sh "$DIR" jobs/recipes/zoology-mqar.yaml --set "$SWEEP" \
  --set data.seq_len="$L" --set data.num_kv_pairs="$KV" --set train.micro_batch="$B" --set train.steps="$STEPS" \
  --set train.early_stop.metric="eval/mqar/len_$L/acc" --set train.eval_every=100 --set train.log_every=50 \
  --set train.compile="${COMPILE:-false}" --set train.precision=bf16-mixed --set train.checkpoint_every=500 \
  --set resources.concurrent_runs="$N" --set resources.gpus_per_worker="$(python3 -c "print(round(1 / $N, 4))")" \
  --set resources.cpus_per_worker=0.75 --set "eval=[{batch_size: $EB, batches: $((3000 / EB))}]" \
  --set train.validation.batches=$((1000 / EB)) "${@:3}"

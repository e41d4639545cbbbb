#!/usr/bin/env bash
# A `hybridlab run` sweep across several device calls (each at most 10 minutes) on one GPU machine.
# The training stack must be unpacked first (../shared/device/README.md, "The training stack").
#
#   bash scripts/device/sweep_calls.sh DIR RUN_ARGS...   # RUN_ARGS: what follows `hybridlab run`
#
# DIR holds the sweep's MLflow store (DIR/mlruns.db, DIR/mlruns/), its checkpoints (DIR/runs/) and one log
# per call (DIR/call_N.log). The first call starts the sweep; every later call on the same DIR continues it
# with `--resume-sweep PARENT` (the parent id is read from DIR's first log), so KILLED runs go on from their
# checkpoints while the machine stays warm (chain the calls: a machine goes back 30 s after a call), or on a
# fresh machine when DIR/runs.tgz came back with the store and is carried in again (unpacked here first, as
# is DIR/mlruns.tgz, the artifacts).
# Each call stops the sweep cleanly after $BUDGET_S seconds (`hybridlab run --time-limit`, default 420): every
# run ends KILLED with a checkpoint or FINISHED, and the `--resume-sweep` line is printed.
# With $OUT set, the store and the logs are copied there (DIR/mlruns.db, DIR/mlruns.tgz, DIR/call_*.log;
# checkpoints too when DIR/runs/ is under $CARRY_CKPT_MB, default 48).
#
# Exit: 0 when every run finished, 130 when the budget stopped the sweep (call again), else the run's.
set -uo pipefail
DIR=${1:?usage: sweep_calls.sh DIR RUN_ARGS...}
shift
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
export MLFLOW_TRACKING_URI="sqlite:///$DIR/mlruns.db" HYBRIDLAB_STOP_GRACE_S=${HYBRIDLAB_STOP_GRACE_S:-60}
ARGS=("$@" --set "storage.path=$DIR/runs" --plain)
N=$(find "$DIR" -maxdepth 1 -name 'call_*.log' | wc -l)
if [ "$N" -gt 0 ]; then
  PARENT=$(grep -ho "sweep parent run id: [0-9a-f]*" "$DIR"/call_1.log | head -1 | awk '{print $NF}')
  [ -n "$PARENT" ] || { echo "sweep_calls: no 'sweep parent run id' in $DIR/call_1.log" >&2; exit 2; }
  ARGS+=(--resume-sweep "$PARENT")
fi
for part in runs mlruns; do
  if [ -f "$DIR/$part.tgz" ] && [ ! -d "$DIR/$part" ]; then tar -C "$DIR" -xzf "$DIR/$part.tgz"; fi
done
LOG=$DIR/call_$((N + 1)).log
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null
start=$(date +%s)
"${PYTHON:-python3}" -m hybridlab run "${ARGS[@]}" --time-limit "${BUDGET_S:-420}" > "$LOG" 2>&1
rc=$?
echo "call $((N + 1)): exit $rc after $(( $(date +%s) - start )) s"
grep -v " step [0-9]*/" "$LOG" | tail -40
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/$(basename "$DIR")"
  cp -r "$DIR"/mlruns.db "$DIR"/call_*.log "$OUT/$(basename "$DIR")/"
  # the artifact store as one archive: its folders nest deeper than the device tool brings back
  [ -d "$DIR/mlruns" ] && tar -C "$DIR" -czf "$OUT/$(basename "$DIR")/mlruns.tgz" mlruns
  if [ -d "$DIR/runs" ] && [ "$(du -sm "$DIR/runs" | cut -f1)" -lt "${CARRY_CKPT_MB:-48}" ]; then
    tar -C "$DIR" -czf "$OUT/$(basename "$DIR")/runs.tgz" runs
  fi
fi
exit $rc

#!/usr/bin/env bash
# The accelerator measurements that BUILD.md's Performance section still
# lacks, as one command: the benchmark table, the sweeps (batch, IG steps,
# devices), the batched against the one-example-at-a-time attack, and the
# training loop against its step. Each part is a run of
# `python -m experiments.benchmark` with its own time limit; a part that
# fails or runs out of time does not stop the others.
#
#   OUT=/tmp/device_check bash experiments/device_check.sh [BENCHMARK FLAGS]
#
# Writes OUT/<part>.json (the benchmark's JSON) and OUT/<part>.log for the
# parts table, attack, sweeps and loop, and OUT/summary.txt (the device and
# each part's exit status and seconds). Flags after the script are added to
# every run (the last value of a flag wins), e.g. --data_npz=PATH for real
# digits instead of the embedded sample, or tiny settings to check the script
# itself on a CPU:
#
#   OUT=/tmp/dc bash experiments/device_check.sh --model=tiny_cnn \
#       --repeats=1 --warmup=0 --ig_steps=4 --pgd_steps=2 \
#       --train_pgd_steps=1 --train_ig_steps=4 --train_approx_factor=2 \
#       --attack_steps=1 --attack_restarts=1 --attack_batch=2 \
#       --attack_ig_steps=4 --loop_steps=4 --loop_log_every=2 \
#       --sweep_batch_sizes=2,4 --sweep_ig_steps=4,8
#
# PART_LIMIT (seconds, default 135) bounds each part, so that the four
# together stay under 10 minutes.
set -uo pipefail
OUT=${OUT:-/tmp/device_check}
LIMIT=${PART_LIMIT:-135}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
{
  date -u
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi: none"
  python -c "import jax; print('jax', jax.__version__, jax.devices())"
} > "$summary" 2>&1

part() {
  local name=$1
  shift
  local start=$SECONDS
  timeout "$LIMIT" python -m experiments.benchmark "$@" \
      --output_json="$OUT/$name.json" > "$OUT/$name.log" 2>&1
  local status=$?
  echo "$name: exit $status in $((SECONDS - start)) s" | tee -a "$summary"
  tail -n 30 "$OUT/$name.log"
}

# The table's rows (IG 100 and 50 points, PGD-40, one step of each objective).
part table --workloads=ig,pgd,train --repeats=5 "$@"
# The attack at the paper's settings, batched and one example at a time.
part attack --workloads=attack --attack_single --repeats=1 --warmup=0 "$@"
# Memory and speed against batch size, IG points (with and without chunks)
# and device count.
part sweeps --workloads=ig --sweeps=batch,ig_steps,devices --repeats=3 "$@"
# The trainer's loop against its step alone (NATURAL: the host's share shows).
part loop --workloads=loop --repeats=3 "$@"
cat "$summary"

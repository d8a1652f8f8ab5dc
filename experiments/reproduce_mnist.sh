#!/usr/bin/env bash
# Reproduces the paper's MNIST rows (NATURAL, Madry, IG-NORM, IG-SUM-NORM) on
# real MNIST digits, on a CPU budget: under 90 minutes on 2 CPU cores for the
# whole recipe. Settings and every deviation from the paper:
# experiments/configs/mnist_cpu.py. Results: experiments/results/mnist_cpu.md.
#
#   bash experiments/reproduce_mnist.sh [RUNS_DIR]     # default runs/mnist_cpu
#
# Needs ../shared/data/mnist_10k.npz beside the repository (or pass
# --config.dataset.name=npz:PATH through EXTRA_FLAGS="..."). Rerunning skips
# the methods already evaluated and resumes unfinished trainings. Writes RUNS_DIR/{METHOD}/ (training
# and evaluation outputs), RUNS_DIR/table.md|csv, RUNS_DIR/table_saliency.png
# and RUNS_DIR/timing.txt (wall seconds per phase).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-runs/mnist_cpu}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
METHODS=(natural madry ig_norm ig_sum_norm)
mkdir -p "$RUNS"
start_all=$(date +%s)
for m in "${METHODS[@]}"; do
  config="experiments/configs/mnist_cpu.py:$m"
  if [[ -f "$RUNS/$m/results.json" ]]; then
    echo "$m: already evaluated ($RUNS/$m/results.json; delete it to redo)" | tee -a "$RUNS/timing.txt"
    continue
  fi
  t0=$(date +%s)
  # shellcheck disable=SC2086
  python experiments/train.py --config="$config" --workdir="$RUNS/$m" $EXTRA_FLAGS
  t1=$(date +%s)
  # shellcheck disable=SC2086
  python experiments/evaluate.py --config="$config" --workdir="$RUNS/$m" \
      --dataset_name=MNIST $EXTRA_FLAGS
  t2=$(date +%s)
  echo "$m train $((t1 - t0)) s, evaluate $((t2 - t1)) s" | tee -a "$RUNS/timing.txt"
done
python experiments/combine.py --figure --output="$RUNS/table" \
    --workdirs="$(printf "$RUNS/%s," "${METHODS[@]}" | sed 's/,$//')"
echo "total $(( $(date +%s) - start_all )) s" | tee -a "$RUNS/timing.txt"

r"""Evaluates a trained model: NA, AA, IN, CO and the figures (absl binary).

  python experiments/evaluate.py --config=experiments/configs/quickstart.py \
      --workdir=/tmp/rar_quickstart
  python experiments/evaluate.py --config=experiments/configs/mnist.py:ig_norm \
      --workdir=/tmp/mnist_ig_norm --num_examples=1000 --saliency=gradient \
      --output=/tmp/mnist_ig_norm/gradient

--config is the config the run was trained with (the same file and
arguments; `--config.attack.*` and `--config.eval.pgd_*` change the attacks).
Reads the latest checkpoint of --workdir and writes, into --workdir or
--output: results.json, results.md, results.csv, per_example.npz,
figure_saliency.png, figure_kendall_hist.png and figure_examples.npz (the
figure's data, for experiments/combine.py; see rar_jax/evaluation.py).
Prints the table row and the main metrics as JSON on stdout. Combine several
runs into one table with experiments/combine.py.
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

# The configs import `experiments.configs.*`: make the repository importable
# when this file is run as a script.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# --config, --workdir, --distributed and the log filter are train.py's: one
# definition each, so both binaries can be imported in one process (tests).
from experiments import train as train_bin  # pylint: disable=g-import-not-at-top,wrong-import-position
from rar_jax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
from rar_jax import evaluation  # pylint: disable=g-import-not-at-top,wrong-import-position

_OUTPUT = flags.DEFINE_string(
    "output", None, "Folder for the results and figures (default: --workdir).")
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples", None, "Evaluate NA, AA and the attribution attack on the "
    "first N test examples only (default: as the config says).", lower_bound=1)
_SALIENCY = flags.DEFINE_enum(
    "saliency", None, ["ig", "gradient"], "Saliency map to attack (default: "
    "config.attack.saliency, 'ig' as the paper's table). The original's "
    "simple-gradient attack kept real-valued pixels on GTSRB/Flower: add "
    "--config.attack.quantize=false to match it.")
_SEED = flags.DEFINE_integer(
    "seed", None, "Seed of the PGD starts and attack restarts (default: "
    "config.seed). The same seed gives the same results.")
_STEP = flags.DEFINE_integer(
    "step", None, "Checkpoint step to evaluate (default: the latest).")
_DATASET_NAME = flags.DEFINE_string(
    "dataset_name", None, "Dataset column of the table (default: from "
    "config.dataset.name, e.g. MNIST).")
_METHOD_NAME = flags.DEFINE_string(
    "method_name", None, "Method column of the table (default: from "
    "config.objective.name, e.g. IG-NORM).")
_FIGURES = flags.DEFINE_bool("figures", True, "Write the PNG figures.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.prefer_eigen_convolutions()  # Faster CPU convs (BUILD.md).
  train_bin.quiet_library_logs()
  if train_bin._DISTRIBUTED.value:  # pylint: disable=protected-access
    jax.distributed.initialize()
  logging.info("JAX devices: %s (process %d of %d)", jax.devices(),
               jax.process_index(), jax.process_count())
  workdir = train_bin._WORKDIR.value  # pylint: disable=protected-access
  try:
    results = evaluation.evaluate_checkpoint(
        train_bin._CONFIG.value, workdir, _OUTPUT.value,  # pylint: disable=protected-access
        step=_STEP.value, num_examples=_NUM_EXAMPLES.value,
        saliency=_SALIENCY.value, seed=_SEED.value,
        dataset_name=_DATASET_NAME.value, method_name=_METHOD_NAME.value,
        figures=_FIGURES.value)
  except (FileNotFoundError, evaluation.CheckpointError) as err:
    # A wrong --workdir or a damaged / mismatched checkpoint: the message says
    # what to do; a library traceback would not help.
    sys.exit(f"evaluate.py: error: {err}")
  if jax.process_index() == 0:
    print("| " + " | ".join(evaluation.TABLE_COLUMNS) + " |")
    print("| " + " | ".join(evaluation.table_row(results)) + " |")
    keys = ("natural_accuracy", "adversarial_accuracy") + evaluation.METRICS + (
        "num_examples_scanned", "num_examples_attacked", "step")
    print(json.dumps({k: results[k] for k in keys}, indent=2, sort_keys=True))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)

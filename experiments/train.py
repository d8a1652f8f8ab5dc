r"""Trains a model with one of the paper's objectives (absl binary).

  python experiments/train.py --config=experiments/configs/quickstart.py \
      --workdir=/tmp/rar_quickstart
  python experiments/train.py --config=experiments/configs/mnist.py:ig_norm \
      --workdir=/tmp/mnist_ig_norm --config.objective.lam=0.5

Rerunning with the same --workdir resumes from its last checkpoint. Prints the
final metrics as JSON on stdout (also in WORKDIR/final_metrics.json).

SIGTERM or Ctrl-C saves a checkpoint after the running step and exits with
status 128 + the signal's number (143, 130); a second Ctrl-C stops at once.
A missing path, unreadable checkpoints or a non-finite loss end with a
one-line error (status 1) that says what to do.
"""

import json
import logging as pylogging
import os
import sys

from absl import app
from absl import flags
from absl import logging

# The configs import `experiments.configs.*`: make the repository importable
# when this file is run as a script.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from rar_jax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
from rar_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. "
    "experiments/configs/quickstart.py (append :smoke for a quick check).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The run's folder: checkpoints, metrics.jsonl, "
    "TensorBoard events (train.py resumes an existing one; evaluate.py reads "
    "its checkpoints and writes its results there).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (one "
    "process per host; it detects the cluster from the environment: Cloud "
    "TPU, SLURM, Open MPI, Kubernetes; other setups: see BUILD.md).")


class _OwnInfoOnly:
  """Shows INFO lines of rar_jax and this binary; libraries' from WARNING up."""

  def filter(self, record):
    if record.getMessage().startswith("Given directory is read only"):
      return False   # orbax, on every read-only restore: nothing to act on
    return (record.levelno >= pylogging.WARNING
            or "rar_jax" in record.pathname or "experiments" in record.pathname)


def quiet_library_logs():
  """Keeps INFO lines of rar_jax and the binaries; libraries' from WARNING."""
  # ABSLHandler.handle skips its own filters, and libraries may have added
  # handlers of their own: filter them all.
  handlers = [logging.get_absl_handler().python_handler]
  handlers += pylogging.getLogger().handlers
  for handler in handlers:
    handler.addFilter(_OwnInfoOnly())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.prefer_eigen_convolutions()  # Faster CPU convs (BUILD.md).
  quiet_library_logs()
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info("JAX devices: %s (process %d of %d)", jax.devices(),
               jax.process_index(), jax.process_count())
  try:
    final = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.Interrupted as err:
    # SIGTERM / Ctrl-C: a checkpoint was saved; exit as the signal would.
    logging.warning("%s", err)
    sys.exit(128 + err.signum)
  except (FileNotFoundError, train.CheckpointError,
          train.NonFiniteError) as err:
    # The message says what to do; a library traceback would not help.
    sys.exit(f"train.py: error: {err}")
  if jax.process_index() == 0:
    print(json.dumps(final, indent=2, sort_keys=True))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)

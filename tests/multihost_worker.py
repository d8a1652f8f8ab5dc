"""One process of the two-process training test (run by train_test.py).

  python tests/multihost_worker.py PROCESS_ID PORT WORKDIR

Joins a 2-process JAX cluster on localhost (2 CPU devices each, gloo
collectives), trains the MNIST Madry smoke preset for 3 steps under pmap and
under shard_map, and writes each run's final parameters and metrics to
WORKDIR/<parallel>.npz (process 0). Then checks how the processes agree to
stop: the agreement itself (WORKDIR/agree_<process>.json), and a long run
in which process 1 alone receives SIGTERM, then resumes and receives it
again during a save (WORKDIR/stop_<process>.json).
"""

import json
import os
import signal
import sys
import threading
import time
from unittest import mock

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments.configs import paper  # pylint: disable=g-import-not-at-top,wrong-import-position
from rar_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position


def smoke_config(parallel):
  config = paper.get_config("mnist,madry,smoke")
  config.parallel = parallel
  config.num_train_steps = 3
  config.checkpoint_every_steps = 0
  return config


def main(process_id, port, workdir):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2,
                             process_id=process_id)
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  for parallel in ("pmap", "shard_map"):
    run_dir = os.path.join(workdir, parallel)
    final = train.train_and_evaluate(smoke_config(parallel), run_dir)
    _, params = train.latest_checkpoint(run_dir)
    if process_id == 0:
      np.savez(os.path.join(workdir, f"{parallel}.npz"),
               adversarial_accuracy=final["adversarial_accuracy"],
               natural_accuracy=final["natural_accuracy"],
               *jax.tree.leaves(params))
  check_agreement(process_id, workdir)
  stop_by_signal(process_id, os.path.join(workdir, "stop"), workdir)


def check_agreement(process_id, workdir):
  """Process 1 alone has a signal: what each call returns on each process."""
  stop = train._StopRequests()  # pylint: disable=protected-access
  got = [stop.requested(wait=False),      # nothing dispatched before: None
         stop.requested(wait=False)]      # the first call's agreement: None
  if process_id == 1:
    stop.signum = signal.SIGTERM
  got.append(stop.requested())            # agreed now: SIGTERM
  got.append(stop.requested(wait=False))  # nothing in flight: None
  got.append(stop.requested(wait=False))  # the previous call's: SIGTERM
  with open(os.path.join(workdir, f"agree_{process_id}.json"), "w") as f:
    json.dump(got, f)


def _run_until_stopped(config, run_dir):
  try:
    train.train_and_evaluate(config, run_dir)
    result = {"stopped": False}
  except train.Interrupted as e:
    result = {"stopped": True, "step": e.step, "signum": e.signum}
  result["saved"] = train.saved_steps(os.path.join(run_dir, "checkpoints"))
  return result


def stop_by_signal(process_id, run_dir, workdir):
  """A long NATURAL run; process 1 alone gets SIGTERM, twice.

  First from another thread after the first checkpoint, landing during
  whichever step is running. Then the same command resumes, and process 1
  sends itself SIGTERM inside its save of the next checkpoint: a signal
  during a step that saves and logs, which the loop reads in its agreement
  at the end of that step.
  """
  config = paper.get_config("mnist,natural,smoke")
  config.num_train_steps = 100_000
  config.checkpoint_every_steps = 20
  config.log_every_steps = 20

  def signal_after_first_checkpoint():
    while not train.saved_steps(os.path.join(run_dir, "checkpoints")):
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  if process_id == 1:
    threading.Thread(target=signal_after_first_checkpoint, daemon=True).start()
  results = [_run_until_stopped(config, run_dir)]

  save = train._save  # pylint: disable=protected-access
  signalled = []   # the step whose save process 1 signalled itself in

  def save_and_signal(manager, step, state):
    if process_id == 1 and not signalled:
      signalled.append(step)
      os.kill(os.getpid(), signal.SIGTERM)  # handled on this (main) thread
    save(manager, step, state)

  with mock.patch.object(train, "_save", save_and_signal):
    results.append(_run_until_stopped(config, run_dir))
  results[1]["signalled_at"] = signalled
  with open(os.path.join(workdir, f"stop_{process_id}.json"), "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  # Read when the backend starts (on first use), so setting them here works.
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

"""Reliability: killed and interrupted runs, damaged checkpoints, numerical
faults, determinism, and one table of bad inputs with their errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from absl import flags
from absl.testing import flagsaver
import jax
from jax import monitoring
import numpy as np
import pytest

import rar_jax
from rar_jax import data as data_lib
from rar_jax import evaluation
from rar_jax import metrics
from rar_jax import models
from rar_jax import objectives
from rar_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import train as train_bin  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.configs import quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG = os.path.join(ROOT, "experiments", "configs", "quickstart.py:smoke")
# Long enough that a signal arrives mid-run, short enough for CI.
RUN = dict(num_train_steps=100, checkpoint_every_steps=20, log_every_steps=10,
           max_checkpoints_to_keep=3)
TIMING_KEYS = ("steps_per_sec", "examples_per_sec", "train_seconds")


def _config(**changes):
  config = quickstart.get_config("smoke")
  config.update(dict(RUN, **changes))
  return config


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _without_timings(record):
  return {k: v for k, v in record.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run: (workdir, final metrics, params)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  final = train.train_and_evaluate(_config(), workdir)
  return workdir, final, train.latest_checkpoint(workdir)[1]


def _assert_same_run(workdir, reference, final):
  """Bit-identical parameters, the same final metrics, every step logged once."""
  ref_dir, ref_final, ref_params = reference
  step, params = train.latest_checkpoint(workdir)
  assert step == RUN["num_train_steps"]
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  assert _without_timings(final) == _without_timings(ref_final)
  steps = lambda d: [r["step"] for r in _read_jsonl(
      os.path.join(d, "metrics.jsonl")) if "train/loss" in r]
  expected = list(range(10, RUN["num_train_steps"] + 1, 10))
  assert steps(ref_dir) == steps(workdir) == expected
  assert sum("eval/adversarial_accuracy" in r for r in _read_jsonl(
      os.path.join(workdir, "metrics.jsonl"))) == 1


def _start_binary(workdir, log_path):
  """The training binary as a separate process (4 fake devices, as here)."""
  overrides = [f"--config.{k}={v}" for k, v in RUN.items()]
  log = open(log_path, "w")  # pylint: disable=consider-using-with
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
       f"--config={CONFIG}", f"--workdir={workdir}", *overrides],
      stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
  return proc, log


def _wait_until(predicate, proc, log_path, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      with open(log_path) as f:
        pytest.fail(f"the run ended or stalled before the signal:\n"
                    f"{f.read()[-3000:]}")
    time.sleep(0.01)


def _checkpoints(workdir):
  return train.saved_steps(os.path.join(workdir, "checkpoints"))


# --- Interrupted runs. --------------------------------------------------------


def test_sigkill_then_rerun_ends_like_an_uninterrupted_run(tmp_path,
                                                           reference):
  workdir, log_path = str(tmp_path / "wd"), str(tmp_path / "log.txt")
  proc, log = _start_binary(workdir, log_path)
  _wait_until(lambda: _checkpoints(workdir), proc, log_path)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  log.close()
  assert proc.returncode == -signal.SIGKILL
  saved = _checkpoints(workdir)
  assert saved and saved[-1] < RUN["num_train_steps"]
  assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))
  # The rerun (same workdir, same settings) resumes from the last checkpoint.
  final = train.train_and_evaluate(_config(), workdir)
  _assert_same_run(workdir, reference, final)


def test_sigterm_saves_a_checkpoint_at_the_step_it_stops(tmp_path, reference):
  workdir, log_path = str(tmp_path / "wd"), str(tmp_path / "log.txt")
  proc, log = _start_binary(workdir, log_path)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  _wait_until(lambda: os.path.exists(metrics_path)
              and os.path.getsize(metrics_path), proc, log_path)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=120)
  log.close()
  with open(log_path) as f:
    output = f.read()
  assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
  stopped = int(output.split("Training stopped by SIGTERM at step ")[1].split(
      " ")[0])
  # The checkpoint of the very step it stopped at (not only a periodic one).
  assert _checkpoints(workdir)[-1] == stopped < RUN["num_train_steps"]
  final = train.train_and_evaluate(_config(), workdir)
  _assert_same_run(workdir, reference, final)


def test_ctrl_c_saves_a_checkpoint_and_restores_the_handler(tmp_path,
                                                            reference):
  workdir = str(tmp_path / "wd")
  metrics_path = os.path.join(workdir, "metrics.jsonl")

  def interrupt():
    deadline = time.time() + 300
    while not (os.path.exists(metrics_path) and os.path.getsize(metrics_path)):
      if time.time() > deadline:
        return
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)

  # Python's default_int_handler, or SIG_IGN where the test process was
  # started with SIGINT ignored (a background job of a non-interactive shell).
  before = signal.getsignal(signal.SIGINT)
  thread = threading.Thread(target=interrupt)
  thread.start()
  with pytest.raises(train.Interrupted, match="stopped by SIGINT") as info:
    train.train_and_evaluate(_config(), workdir)
  thread.join()
  assert info.value.signum == signal.SIGINT
  assert _checkpoints(workdir)[-1] == info.value.step
  assert signal.getsignal(signal.SIGINT) is before
  final = train.train_and_evaluate(_config(), workdir)
  _assert_same_run(workdir, reference, final)


def test_a_half_written_metrics_line_is_dropped_on_resume(tmp_path,
                                                          reference):
  workdir = str(tmp_path / "wd")
  shutil.copytree(reference[0], workdir)
  for step in _checkpoints(workdir)[1:]:   # back to the oldest checkpoint
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 160, "train/lo')   # a kill in the middle of a write
  final = train.train_and_evaluate(_config(), workdir)
  _assert_same_run(workdir, reference, final)


# --- Damaged checkpoints. -----------------------------------------------------


def _truncate_largest_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def _delete_metadata(step_dir):
  for d, _, files in os.walk(step_dir):
    for name in files:
      if "METADATA" in name.upper() or name.endswith(".json"):
        os.remove(os.path.join(d, name))


@pytest.mark.parametrize("damage", [_truncate_largest_file, _delete_metadata])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    tmp_path, reference, damage, caplog):
  workdir = str(tmp_path / "wd")
  shutil.copytree(reference[0], workdir)
  steps = _checkpoints(workdir)
  assert len(steps) == 3, steps
  latest = os.path.join(workdir, "checkpoints", str(steps[-1]))
  damage(latest)
  # A save killed midway leaves a temporary folder: not a step, ignored.
  os.makedirs(os.path.join(workdir, "checkpoints",
                           f"{steps[-1] + 10}.orbax-checkpoint-tmp-1"))
  with caplog.at_level("WARNING"):
    final = train.train_and_evaluate(_config(), workdir)
  assert f"Checkpoint step {steps[-1]}" in caplog.text
  assert f"resumed from step {steps[-2]}" in caplog.text
  # Nothing is deleted: the damaged step is set aside, then retrained.
  assert os.path.isdir(os.path.join(workdir, "checkpoints_corrupt",
                                    str(steps[-1])))
  _assert_same_run(workdir, reference, final)


def test_no_readable_checkpoint_stops_with_a_clear_message(tmp_path,
                                                           reference):
  workdir = str(tmp_path / "wd")
  shutil.copytree(reference[0], workdir)
  steps = _checkpoints(workdir)
  for step in steps:
    _truncate_largest_file(os.path.join(workdir, "checkpoints", str(step)))
  with pytest.raises(train.CheckpointError,
                     match=r"None of the checkpoints .* can be restored: "
                     rf"step {steps[-1]}: .*Nothing was changed"):
    train.train_and_evaluate(_config(), workdir)
  assert _checkpoints(workdir) == steps
  assert not os.path.exists(os.path.join(workdir, "checkpoints_corrupt"))


def test_the_binary_reports_unreadable_checkpoints_in_one_line(tmp_path,
                                                               reference):
  workdir = str(tmp_path / "wd")
  shutil.copytree(reference[0], workdir)
  for step in _checkpoints(workdir):
    _delete_metadata(os.path.join(workdir, "checkpoints", str(step)))
  argv = ["train.py", f"--config={CONFIG}", f"--workdir={workdir}"] + [
      f"--config.{k}={v}" for k, v in RUN.items()]
  with flagsaver.flagsaver(), pytest.MonkeyPatch.context() as mp:
    mp.setattr(sys, "argv", argv)
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    with pytest.raises(SystemExit, match=r"^train.py: error: None of the "
                       r"checkpoints"):
      train_bin.main(["train.py"])


# --- Numerical faults. --------------------------------------------------------


@pytest.mark.parametrize("checkpoint_every", [1, 2])
def test_an_infinite_update_is_never_checkpointed(tmp_path, checkpoint_every):
  # A learning rate of 1e39 is inf in float32: the loss and gradient of step
  # 1 are finite, the updated parameters are not. Step 1 saves, or it is
  # checked while step 2 runs (from its non-finite parameters).
  config = _config(num_train_steps=3, checkpoint_every_steps=checkpoint_every)
  config.optimizer.learning_rate = 1e39
  workdir = str(tmp_path / "wd")
  with pytest.raises(train.NonFiniteError,
                     match=r"Non-finite updated parameters at step 1 .*; no "
                     r"checkpoint was saved before it"):
    train.train_and_evaluate(config, workdir)
  assert not _checkpoints(workdir)


# Every step saves (and is checked before the next runs), or step 4 neither
# logs nor saves (it is checked while step 5 runs).
@pytest.mark.parametrize("checkpoint_every", [1, 3])
def test_an_overflow_stops_training_and_keeps_the_last_good_checkpoint(
    tmp_path, checkpoint_every):
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(16, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 16)
  data = f"npz:{tmp_path}"
  for split in ("train", "test"):
    np.savez(tmp_path / f"{split}.npz", images=images, labels=labels)
  config = _config(num_train_steps=3, checkpoint_every_steps=checkpoint_every,
                   max_checkpoints_to_keep=10)
  config.dataset.name = data
  config.objective.clip_max = 3.4e38     # declared: any float32 pixel
  workdir = str(tmp_path / "wd")
  train.train_and_evaluate(config, workdir)
  # The same files now hold float32's largest value: the step overflows.
  np.savez(tmp_path / "train.npz", images=np.full_like(images, 3.4e38),
           labels=labels)
  config.num_train_steps = 10
  with pytest.raises(train.NonFiniteError,
                     match=r"Non-finite .* at step 4 .* the last good "
                     r"checkpoint is step 3 in "):
    train.train_and_evaluate(config, workdir)
  assert _checkpoints(workdir) == list(range(checkpoint_every, 4,
                                             checkpoint_every))
  _, params = train.latest_checkpoint(workdir)
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


# --- Determinism. -------------------------------------------------------------


def test_the_same_config_and_seed_give_identical_runs(tmp_path, reference):
  workdir = str(tmp_path / "again")
  final = train.train_and_evaluate(_config(), workdir)
  _assert_same_run(workdir, reference, final)
  records = lambda d: [_without_timings(r) for r in _read_jsonl(
      os.path.join(d, "metrics.jsonl"))]
  assert records(workdir) == records(reference[0])
  # And another seed gives another run.
  other = str(tmp_path / "other_seed")
  train.train_and_evaluate(_config(seed=1), other)
  assert records(other) != records(workdir)


# --- Bad input: one table, each case one clear error, nothing compiled. -------

_COMPILES = []
monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kwargs: _COMPILES.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)

_RNG = np.random.default_rng(0)
X = _RNG.uniform(size=(2, 8, 8, 1)).astype(np.float32)   # images in [0, 1]
Y = np.array([0, 2], np.int32)
W = np.zeros((64, 3), np.float32)                          # 3 classes
NAN_X = X.copy()
NAN_X[1, 2, 3, 0] = np.nan
BIG_X = X * 2.0
APPLY = lambda p, z: z.reshape(z.shape[0], -1) @ p
LOGIT0 = lambda z: z.reshape(z.shape[0], -1).sum(axis=1)
KEY = jax.random.key(0)   # made here: the table's cases compile nothing
HYPER = dict(epsilon=0.1, step_size=0.02, num_steps=2, m=4, approx_factor=2,
             lam=1.0)


def _ig(**kw):
  args = dict(f=LOGIT0, inputs=X)
  args.update(kw)
  return rar_jax.integrated_gradients(args.pop("f"), args.pop("inputs"),
                                      **args)


def _pgd(inputs=X, **kw):
  args = dict(epsilon=0.1, step_size=0.01, num_steps=2)
  args.update(kw)
  return rar_jax.attacks.pgd(LOGIT0, inputs, **args)


def _attack(inputs=X, labels=Y, **kw):
  args = dict(epsilon=0.1, step_size=0.01, num_steps=2, k_top=4,
              num_ig_steps=4)
  args.update(kw)
  return rar_jax.attribution_attack(APPLY, W, inputs, labels, **args)


def _loss(name="ig_norm", inputs=X, labels=Y, **kw):
  hyper = dict(HYPER, **kw)
  return objectives.loss(name, APPLY, W, inputs, labels,
                         key=KEY, **hyper)


def _write_npz(tmp_path, images, labels, name="train.npz"):
  np.savez(tmp_path / name, images=images, labels=labels)
  return f"npz:{tmp_path}"


def _train(tmp_path, images=None, labels=None, **changes):
  """train_and_evaluate on the smoke config with `changes` (dotted keys)."""
  config = quickstart.get_config("smoke")
  if images is not None:
    imgs = np.concatenate([images] * 8)
    labs = np.concatenate([labels] * 8)
    config.dataset.name = _write_npz(tmp_path, imgs, labs)
    _write_npz(tmp_path, imgs, labs, "test.npz")
  for key, value in changes.items():
    section = config
    *path, field = key.split("__")
    for p in path:
      section = section[p]
    section[field] = value
  train.train_and_evaluate(config, str(tmp_path / "wd"))


def _corrupt_npz(tmp_path):
  (tmp_path / "train.npz").write_bytes(b"PK\x03\x04 not really a zip")
  return data_lib.load_dataset(f"npz:{tmp_path}", "train")


def _bad_config_json(tmp_path):
  os.makedirs(tmp_path / "wd")
  (tmp_path / "wd" / "config.json").write_text('{"seed": 0, "batch_')
  _train(tmp_path)


def _binary_flags(tmp_path, *args):
  argv = ["train.py", f"--workdir={tmp_path}", *args]
  with flagsaver.flagsaver(), pytest.MonkeyPatch.context() as mp:
    mp.setattr(sys, "argv", argv)
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    train_bin.main(["train.py"])


BYTE_X = (X * 255).round()
# (id, call(tmp_path), exception, regex the message must match)
BAD_INPUTS = [
    # Integrated gradients.
    ("ig_nan_inputs", lambda t: _ig(inputs=NAN_X), ValueError,
     r"inputs has 1 NaN or infinite values in 1 example\(s\), the first at "
     r"index 1; accepted: finite"),
    ("ig_int_inputs", lambda t: _ig(inputs=np.ones((2, 3), np.int32)),
     ValueError, r"floating point .* got dtype int32"),
    ("ig_zero_steps", lambda t: _ig(num_steps=0), ValueError,
     r"num_steps=0"),
    ("ig_unknown_method", lambda t: _ig(method="simpson"), ValueError,
     r"'simpson'.*riemann_right"),
    ("ig_baseline_shape", lambda t: _ig(baselines=np.zeros((3, 8, 8, 1))),
     ValueError, r"baselines of shape \(3, 8, 8, 1\) do not broadcast"),
    ("ig_inf_baseline", lambda t: _ig(baselines=np.full((8, 8, 1), np.inf)),
     ValueError, r"baselines has 64 NaN or infinite"),
    ("ig_not_per_example", lambda t: _ig(f=lambda z: z.sum()), ValueError,
     r"per-example scalars of shape \[N\] = \(2,\); it returned shape \(\)"),
    ("ig_zero_chunk", lambda t: _ig(chunk_size=0), ValueError,
     r"chunk_size=0"),
    # PGD.
    ("pgd_negative_epsilon", lambda t: _pgd(epsilon=-0.1), ValueError,
     r"epsilon=-0.1 is not accepted; it must be a number >= 0"),
    ("pgd_zero_steps", lambda t: _pgd(num_steps=0), ValueError,
     r"num_steps=0 is not accepted; it must be an int >= 1"),
    ("pgd_zero_step_size", lambda t: _pgd(step_size=0.0), ValueError,
     r"step_size=0.0 is not accepted"),
    ("pgd_unknown_norm", lambda t: _pgd(norm="l1"), ValueError,
     r"Unknown norm 'l1'; accepted: linf, l2"),
    ("pgd_outside_box", lambda t: _pgd(inputs=BIG_X), ValueError,
     r"inputs has values in \[[\d.e-]+, 1.9\d*\], outside the pixel box "
     r"\[clip_min, clip_max\] = \[0, 1\]"),
    ("pgd_nan_inputs", lambda t: _pgd(inputs=NAN_X), ValueError,
     r"inputs has 1 NaN"),
    ("pgd_empty_box", lambda t: _pgd(clip_min=1.0, clip_max=0.0), ValueError,
     r"clip_min=1.0 must be smaller than clip_max=0.0"),
    # The attribution attack.
    ("attack_labels_out_of_range", lambda t: _attack(labels=np.array([0, 5])),
     ValueError, r"labels in \[0, 5\] .* 3 classes; accepted: 0 <= label < 3"),
    ("attack_labels_shape", lambda t: _attack(labels=np.array([0, 1, 2])),
     ValueError, r"labels of shape \(3,\) do not match .* \[N\] = \(2,\)"),
    ("attack_float_labels", lambda t: _attack(labels=np.array([0.0, 1.0])),
     ValueError, r"labels of dtype float64 are not accepted"),
    ("attack_k_too_large", lambda t: _attack(k_top=65), ValueError,
     r"k_top=65"),
    ("attack_unknown_attack", lambda t: _attack(attack="topk2"), ValueError,
     r"Unknown attack 'topk2'"),
    ("attack_unknown_saliency", lambda t: _attack(saliency="lime"), ValueError,
     r"Unknown saliency 'lime'"),
    ("attack_flat_inputs", lambda t: _attack(inputs=X.reshape(2, 64)),
     ValueError, r"inputs of shape \(2, 64\) are not accepted"),
    ("attack_0_255_pixels_in_0_1_box", lambda t: _attack(inputs=BYTE_X),
     ValueError, r"outside the pixel box .*e.g. 0 and 255"),
    ("attack_zero_restarts", lambda t: _attack(num_restarts=0), ValueError,
     r"num_restarts=0"),
    ("attack_zero_steps", lambda t: _attack(num_steps=0), ValueError,
     r"num_steps=0"),
    # Objectives.
    ("loss_unknown_objective", lambda t: _loss("ig_normm"), ValueError,
     r"Unknown objective 'ig_normm'; accepted: natural, madry"),
    ("loss_labels_out_of_range", lambda t: _loss(labels=np.array([3, 0])),
     ValueError, r"labels in \[0, 3\]"),
    ("loss_nan_inputs", lambda t: _loss(inputs=NAN_X), ValueError,
     r"inputs has 1 NaN"),
    ("loss_negative_epsilon", lambda t: _loss(epsilon=-1.0), ValueError,
     r"epsilon=-1.0"),
    ("loss_zero_m", lambda t: _loss(m=0), ValueError, r"m=0"),
    ("loss_unknown_reduction", lambda t: _loss(reduction="avg"), ValueError,
     r"'avg'"),
    ("loss_unknown_hyper", lambda t: _loss(lamda=1.0), ValueError,
     r"lamda"),
    # Metrics.
    ("kendall_shapes", lambda t: metrics.kendall_tau(np.ones((2, 4)),
                                                     np.ones((2, 5))),
     ValueError, r"same shape; got a.shape=\(2, 4\) and b.shape=\(2, 5\)"),
    ("kendall_nan", lambda t: metrics.kendall_tau(
        np.array([[1.0, np.nan]]), np.ones((1, 2))), ValueError,
     r"kendall_tau: a has 1 NaN"),
    ("topk_zero_k", lambda t: metrics.topk_intersection(
        np.ones((1, 4)), np.ones((1, 4)), k=0), ValueError, r"k=0"),
    ("spearman_unbatched", lambda t: metrics.spearman_rho(np.ones(4),
                                                          np.ones(4)),
     ValueError, r"must be batched, .* got shape \(4,\)"),
    # Models and data.
    ("unknown_model", lambda t: models.get_model("resnet9", num_classes=10),
     ValueError, r"'resnet9'"),
    ("unknown_dataset", lambda t: data_lib.load_dataset("mnistt", "train"),
     ValueError, r"Unknown dataset name 'mnistt'"),
    ("missing_npz", lambda t: data_lib.load_dataset(f"npz:{t}/none.npz",
                                                    "train"),
     FileNotFoundError, r"none.npz"),
    ("corrupt_npz", _corrupt_npz, ValueError,
     r"train.npz' cannot be read as a .npz file"),
    ("npz_wrong_keys", lambda t: (np.savez(t / "train.npz", x=X, y=Y),
                                  data_lib.load_dataset(f"npz:{t}", "train")),
     ValueError, r"has keys \['x', 'y'\]; accepted: 'images'/'labels'"),
    ("npz_labels_mismatch", lambda t: (
        _write_npz(t, X, np.zeros(3, np.int64)),
        data_lib.load_dataset(f"npz:{t}", "train")), ValueError,
     r"labels must be \[N\] with N = 2 images; got shape \(3,\)"),
    # Training configs and data (train_and_evaluate).
    ("batch_not_divisible", lambda t: _train(t, batch_size=6), ValueError,
     r"batch_size=6 is not divisible by the number of devices 4"),
    ("eval_batch_not_divisible", lambda t: _train(t, eval__batch_size=6),
     ValueError, r"eval.batch_size=6 is not divisible"),
    ("unknown_parallel", lambda t: _train(t, parallel="pjit"), ValueError,
     r"parallel='pjit'; accepted: pmap, shard_map"),
    ("unknown_model_in_config", lambda t: _train(t, model__name="resnet"),
     ValueError, r"'resnet'"),
    ("unknown_objective_in_config",
     lambda t: _train(t, objective__name="ig"), ValueError,
     r"Unknown objective 'ig'"),
    ("unknown_optimizer", lambda t: _train(t, optimizer__name="adagrad"),
     ValueError, r"Unknown optimizer 'adagrad'; accepted: adam, sgd"),
    ("lr_schedule_lengths", lambda t: _train(
        t, optimizer__lr_values=(0.1, 0.01), optimizer__lr_boundaries=(5, 9)),
     ValueError, r"lr_values=\[0.1, 0.01\] must have one more entry"),
    ("too_many_devices", lambda t: _train(t, num_devices=9), ValueError,
     r"num_devices=9 .* 4 local devices"),
    ("negative_epsilon_in_config",
     lambda t: _train(t, objective__epsilon=-1.0), ValueError,
     r"epsilon=-1.0"),
    ("zero_train_steps", lambda t: _train(t, num_train_steps=0), ValueError,
     r"num_train_steps=0 is not accepted"),
    ("missing_data_path",
     lambda t: _train(t, dataset__name="npz:/does/not/exist"),
     FileNotFoundError, r"/does/not/exist"),
    ("nan_pixels_in_data", lambda t: _train(t, NAN_X.reshape(2, 8, 8),
                                            Y), ValueError,
     r"has 8 images with NaN or infinite pixels \(the first at index 1\)"),
    ("0_255_data_with_0_1_box", lambda t: _train(t, BYTE_X, Y), ValueError,
     r"pixels in \[\d+, \d+\], outside the declared pixel range "
     r"objective.clip_min=0, objective.clip_max=1"),
    ("labels_beyond_num_classes", lambda t: _train(
        t, X, np.array([0, 12])), ValueError,
     r"labels in \[0, 12\], outside \[0, 10\); set dataset.num_classes"),
    ("batch_larger_than_data", lambda t: _train(t, X, Y, batch_size=32),
     ValueError, r"batch_size=32 is larger than the training set \(16"),
    ("unreadable_config_json", _bad_config_json, ValueError,
     r"Cannot read .*config.json"),
    # Flags of the binaries.
    ("unknown_paper_preset", lambda t: _binary_flags(
        t, f"--config={ROOT}/experiments/configs/paper.py:mnist,trade"),
     Exception, r"Unknown paper preset 'mnist,trade'"),
    ("config_override_of_wrong_type", lambda t: _binary_flags(
        t, f"--config={CONFIG}", "--config.batch_size=eight"),
     flags.Error, r"eight"),
    ("unknown_config_field", lambda t: _binary_flags(
        t, f"--config={CONFIG}", "--config.batchsize=8"),
     (KeyError, AttributeError), r"batchsize.*Did you mean \"batch_size\""),
    ("evaluation_without_checkpoints", lambda t: evaluation.restore_params(
        str(t)), FileNotFoundError, r"No checkpoint in workdir"),
]


@pytest.mark.parametrize("call, error, match",
                         [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gives_one_clear_error_before_compiling(tmp_path, call,
                                                          error, match):
  del _COMPILES[:]
  with pytest.raises(error, match=match):
    call(tmp_path)
  assert not _COMPILES, f"compiled {len(_COMPILES)} program(s) first"
  assert not os.path.exists(tmp_path / "wd" / "checkpoints")


def test_the_table_covers_forty_cases():
  assert len(BAD_INPUTS) >= 40
  assert len({case[0] for case in BAD_INPUTS}) == len(BAD_INPUTS)

"""Tests of rar_jax.train and experiments/train.py on smoke configs."""

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
from unittest import mock

from absl import flags
from absl.testing import flagsaver
import jax
from jax import monitoring
import numpy as np
import optax
import pytest

from rar_jax import data as data_lib
from rar_jax import models
from rar_jax import summary
from rar_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import train as train_bin  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.configs import paper  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.configs import quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests import multihost_worker  # pylint: disable=g-import-not-at-top,wrong-import-position


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _run_binary(workdir, *overrides, config="quickstart.py:smoke"):
  argv = ["train.py",
          f"--config={os.path.join(ROOT, 'experiments', 'configs', config)}",
          f"--workdir={workdir}", *overrides]
  # ml_collections reads the --config.* overrides from sys.argv itself.
  with flagsaver.flagsaver(), mock.patch.object(sys, "argv", argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    train_bin.main(["train.py"])


@contextlib.contextmanager
def _compile_events():
  """Collects the (event, function) of every lowering and XLA compile."""
  events = []

  def listener(event, duration, **kwargs):
    del duration
    if event in ("/jax/core/compile/jaxpr_to_mlir_module_duration",
                 "/jax/core/compile/backend_compile_duration"):
      events.append((event, kwargs.get("fun_name")))

  monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    monitoring.unregister_event_duration_listener(listener)


def test_binary_end_to_end_and_resume_to_the_same_parameters(tmp_path,
                                                             capsys):
  # Uninterrupted: 4 steps.
  full = str(tmp_path / "full")
  _run_binary(full)
  printed = json.loads(capsys.readouterr().out)
  assert printed["step"] == 4
  assert 0.0 <= printed["natural_accuracy"] <= 1.0
  assert "adversarial_accuracy" in printed
  with open(os.path.join(full, "final_metrics.json")) as f:
    assert json.load(f) == printed
  # Interrupted after the checkpoint at step 2, then rerun to step 4. The
  # same settings in the same process: the programs of the first run are
  # reused (train._programs), nothing is lowered or compiled again.
  resumed = str(tmp_path / "resumed")
  with _compile_events() as events:
    _run_binary(resumed, "--config.num_train_steps=2")
    _run_binary(resumed)
  assert not events, events
  step_a, params_a = train.latest_checkpoint(full)
  step_b, params_b = train.latest_checkpoint(resumed)
  assert step_a == step_b == 4
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  # metrics.jsonl: the same training steps, none duplicated or missing.
  train_steps = lambda d: [r["step"] for r in _read_jsonl(
      os.path.join(d, "metrics.jsonl")) if "train/loss" in r]
  assert train_steps(full) == train_steps(resumed) == [2, 4]
  record = [r for r in _read_jsonl(os.path.join(full, "metrics.jsonl"))
            if "train/loss" in r][-1]
  for key in ("train/ce", "train/reg", "train/accuracy", "steps_per_sec",
              "examples_per_sec", "train/grad_norm"):
    assert np.isfinite(record[key])
  # Rerunning a finished run re-evaluates without logging any step twice.
  _run_binary(full)
  records = _read_jsonl(os.path.join(full, "metrics.jsonl"))
  keys = [(r["step"], tuple(sorted(r))) for r in records]
  assert len(keys) == len(set(keys)) == 3, records
  # TensorBoard events: readable records with the logged scalars.
  events = [f for f in os.listdir(full) if f.startswith("events.out")]
  assert len(events) == 2   # one per run
  blobs = b"".join(b"".join(summary.read_records(os.path.join(full, e)))
                   for e in events)
  assert b"brain.Event:2" in blobs and b"train/loss" in blobs


def test_resuming_a_finished_run_with_another_objective_is_refused(tmp_path):
  workdir = str(tmp_path / "wd")
  _run_binary(workdir, "--config.num_train_steps=1")
  with pytest.raises(ValueError, match=r"different settings for \['objective'"):
    _run_binary(workdir, "--config.objective.name=madry")


def _params_after(parallel, num_devices, tmp_path):
  """(final metrics, parameters) of 3 Madry smoke steps (no checkpoints)."""
  config = multihost_worker.smoke_config(parallel)
  config.num_devices = num_devices
  workdir = str(tmp_path / f"{parallel}{num_devices}")
  metrics = train.train_and_evaluate(config, workdir)
  return metrics, train.latest_checkpoint(workdir)[1]


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  """`_params_after` on this process's 4 devices, per parallel mode: the
  reference of the one-device and the two-process runs."""
  tmp_path = tmp_path_factory.mktemp("four_devices")
  return {parallel: _params_after(parallel, 4, tmp_path)
          for parallel in ("pmap", "shard_map")}


def test_pmap_shard_map_and_one_device_give_the_same_parameters(
    tmp_path, four_devices):
  assert jax.local_device_count() == 4
  one_metrics, one = _params_after("pmap", 1, tmp_path)
  pmap_metrics, four = four_devices["pmap"]
  shard_metrics, sharded = four_devices["shard_map"]
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  jax.tree.map(close, one, four)
  jax.tree.map(close, one, sharded)
  # The random PGD starts are per example, so the attack is the same too.
  assert (one_metrics["adversarial_accuracy"]
          == pmap_metrics["adversarial_accuracy"]
          == shard_metrics["adversarial_accuracy"])


@pytest.mark.parametrize("objective,reduction", [
    ("natural", "mean"), ("ig_norm", "sum")])
def test_one_step_on_four_devices_is_the_step_on_one(objective, reduction):
  """The step's gradient is summed over the devices once, in both modes.

  With SGD and weight decay the update is linear in the gradient and not
  scale-free (Adam, as in the test above, hides a gradient n times too
  large). IG-NORM differentiates through a loop (the IG scan), where the
  gradient of a replicated parameter would be summed over the devices in
  every iteration under shard_map.
  """
  init_fn, apply_fn, _ = models.make_apply_fns("tiny_cnn", num_classes=3)
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(8, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 3, size=8).astype(np.int32)
  keys = np.asarray(jax.random.key_data(jax.random.split(
      jax.random.key(1), 8)))
  params = init_fn(jax.random.key(0), x[:1])
  tx = optax.sgd(0.5, momentum=0.9)
  state = {"params": params, "opt_state": tx.init(params),
           "step": np.int32(0)}
  hyper = dict(epsilon=0.3, step_size=0.1, num_steps=2, m=4, approx_factor=2,
               lam=1.0, gamma=1.0, clip_min=0.0, clip_max=1.0,
               reduction=reduction)
  step = functools.partial(train.train_step, apply_fn=apply_fn,
                           objective=objective, hyper=hyper, tx=tx,
                           weight_decay=0.01)
  out = {}
  for kind, n in (("pmap", 1), ("pmap", 4), ("shard_map", 4)):
    parallel = train._Parallel(kind, n)  # pylint: disable=protected-access
    new, sums = parallel.compile(step, num_replicated=1)(
        parallel.replicate(state), *parallel.shard([x, y, keys]))
    out[kind, n] = parallel.unreplicate((new["params"], sums))
  (one, one_sums) = out["pmap", 1]
  assert one_sums["grad_norm"] > 0
  for kind in ("pmap", "shard_map"):
    params_n, sums_n = out[kind, 4]
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5,
                                   atol=1e-6), params_n, one)
    for name in ("grad_norm", "loss", "count"):
      np.testing.assert_allclose(sums_n[name], one_sums[name], rtol=2e-5,
                                 err_msg=f"{kind} {name}")


def test_several_processes_refuse_fewer_devices_than_they_use(monkeypatch):
  """With several processes the placement spans all local devices."""
  config = train.default_config()
  local = jax.local_device_count()
  config.num_devices = local - 1
  assert train._num_devices(config) == local - 1   # one process: as asked
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match=(
      rf"num_devices={local - 1} is not accepted with 2 processes: each "
      rf"process uses all its {local} local devices")):
    train._num_devices(config)
  with pytest.raises(ValueError, match=rf"num_devices={local - 1}"):
    train.check_divisible("batch_size", 8 * local, config)
  config.num_devices = local
  assert train._num_devices(config) == local
  config.num_devices = None
  assert train._num_devices(config) == local


def test_two_processes_train_like_one_process_with_as_many_devices(
    tmp_path, four_devices):
  """jax.distributed on localhost: 2 processes x 2 devices == 1 x 4."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  worker = os.path.join(ROOT, "tests", "multihost_worker.py")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, worker, str(i), str(port),
                             str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in (0, 1)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  for parallel in ("pmap", "shard_map"):
    single, params = four_devices[parallel]
    multi = np.load(tmp_path / f"{parallel}.npz")
    leaves = jax.tree.leaves(params)
    for i, leaf in enumerate(leaves):
      np.testing.assert_allclose(multi[f"arr_{i}"], leaf, rtol=1e-5,
                                 atol=1e-6)
    assert float(multi["adversarial_accuracy"]) == (
        single["adversarial_accuracy"])
    assert float(multi["natural_accuracy"]) == single["natural_accuracy"]
  # Only process 1 had the signal; both see it at once when waiting, and
  # one call later without waiting (the loop's every step).
  for i in (0, 1):
    with open(tmp_path / f"agree_{i}.json") as f:
      assert json.load(f) == [None, None, signal.SIGTERM, None, signal.SIGTERM]
  # SIGTERM to process 1 alone: both stop at the same step, after saving it.
  runs = []
  for i in (0, 1):
    with open(tmp_path / f"stop_{i}.json") as f:
      runs.append(json.load(f))
  first, resumed = runs[0][0], runs[0][1]
  assert runs[0][0] == runs[1][0], runs
  assert first["stopped"] and first["signum"] == signal.SIGTERM
  assert 20 <= first["step"] == first["saved"][-1] < 100_000
  # Resumed, then SIGTERM to process 1 inside its save of the next
  # checkpoint: both stop at that very step, with its checkpoint.
  next_save = (first["step"] // 20 + 1) * 20
  assert runs[0][1]["signalled_at"] == [] and (
      runs[1][1]["signalled_at"] == [next_save]), runs
  for run in (runs[0][1], runs[1][1]):
    run.pop("signalled_at")
  assert runs[0][1] == runs[1][1], runs
  assert resumed["stopped"] and resumed["signum"] == signal.SIGTERM
  assert resumed["step"] == next_save
  assert resumed["saved"][-2:] == [first["step"], next_save]


def test_all_sixteen_paper_presets_are_valid():
  for dataset in paper.DATASETS:
    for method in paper.METHODS:
      config = paper.get_config(f"{dataset},{method}")
      config.num_devices = 2   # the paper's batch of 50 does not split in 4
      train.validate_config(config)
      assert config.objective.name == method
  mnist = paper.get_config("mnist,ig_norm")
  assert (mnist.objective.epsilon, mnist.objective.num_steps,
          mnist.objective.step_size, mnist.objective.m,
          mnist.objective.approx_factor, mnist.objective.lam) == (
              0.3, 40, 0.01, 50, 5, 1.0)
  assert paper.get_config("mnist,ig_sum_norm").objective.lam == 0.1
  assert paper.get_config("mnist,natural").num_train_steps == 25000
  flower = paper.get_config("flower,ig_sum_norm")
  assert tuple(flower.optimizer.lr_values) == (1e-4, 1e-3, 1e-4)
  assert flower.batch_size == 16 and flower.objective.lam == 0.1
  gtsrb = paper.get_config("gtsrb,madry")
  assert gtsrb.objective.reduction == "mean"
  assert gtsrb.optimizer.weight_decay == 2e-4
  assert paper.get_config("fashion_mnist,madry").objective.epsilon == 0.1
  with pytest.raises(ValueError, match="Unknown paper preset 'mnist,trade'"):
    paper.get_config("mnist,trade")


def test_mnist_cpu_presets_keep_the_paper_objectives_and_evaluation():
  from experiments.configs import mnist_cpu  # pylint: disable=g-import-not-at-top
  for method in paper.METHODS:
    config = mnist_cpu.get_config(method)
    config.num_devices = 2   # a batch of 50 does not split in 4
    train.validate_config(config)
    reference = paper.get_config(f"mnist,{method}")
    for key in ("name", "epsilon", "lam", "reduction", "clip_min",
                "clip_max"):
      assert config.objective[key] == reference.objective[key], key
    assert config.batch_size == 50
    assert (config.eval.pgd_epsilon, config.eval.pgd_num_steps,
            config.eval.pgd_step_size) == (0.3, 40, 0.01)
    assert (config.attack.k_top, config.attack.eval_k,
            config.attack.step_size) == (200, 100, 0.01)
    assert config.dataset.name.endswith("mnist_10k.npz")
    assert (config.dataset.train_split, config.dataset.test_split) == (
        "train[:8000]", "train[8000:]")
  with pytest.raises(ValueError, match="Unknown mnist_cpu preset 'trades'"):
    mnist_cpu.get_config("trades")


def test_gtsrb_smoke_trains_on_prepared_npz_data(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (("train", 16), ("test", 8)):
    np.savez(tmp_path / f"{split}.npz",
             images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
             labels=rng.integers(0, 43, n).astype(np.int64))
  config = paper.get_config("gtsrb,ig_sum_norm,smoke")
  config.dataset.name = f"npz:{tmp_path}"
  loaded, original = [], data_lib.load_dataset

  def load(*args, **kwargs):
    images, labels = original(*args, **kwargs)
    loaded.append(images)
    return images, labels

  with mock.patch.object(train.data_lib, "load_dataset", load):
    metrics = train.train_and_evaluate(config, str(tmp_path / "wd"))
  assert metrics["step"] == 2
  assert np.isfinite(metrics["natural_accuracy"])
  # The 8-bit train split stays 8-bit in memory; the test split is float32.
  assert isinstance(loaded[0], data_lib.ScaledPixels)
  assert isinstance(loaded[1], np.ndarray) and loaded[1].dtype == np.float32
  # Pixels outside the declared box are refused from the stored extremes.
  config.objective.clip_max = 1.0
  with pytest.raises(ValueError, match=r"train split .* has pixels in "
                     r"\[0, 255\], outside the declared pixel range"):
    train.train_and_evaluate(config, str(tmp_path / "wd2"))


def test_learning_rate_schedule_is_piecewise_constant():
  config = paper.get_config("gtsrb,natural")
  schedule = train.learning_rate_schedule(config.optimizer)
  np.testing.assert_allclose(
      [schedule(s) for s in (0, 500, 501, 60000, 60001)],
      [1e-3, 1e-3, 1e-2, 1e-2, 1e-3], rtol=1e-6)
  assert train.learning_rate_schedule(quickstart.get_config().optimizer) == 2e-3


def test_example_keys_are_the_documented_pure_function_of_the_step():
  # A resumed run draws the same keys as the run it continues: per example,
  # split(fold_in(fold_in(key(seed), salt), step), B), whichever program
  # computes them.
  for seed, step, batch, salt in ((0, 0, 4, 0), (4557077, 99999, 6, 1)):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), salt),
                             step)
    expected = np.asarray(jax.random.key_data(jax.random.split(key, batch)))
    got = train._example_keys(seed, step, batch, salt)  # pylint: disable=protected-access
    assert isinstance(got, np.ndarray) and got.shape == (batch, 2)
    np.testing.assert_array_equal(got, expected)
  assert not np.array_equal(train._example_keys(0, 1, 4),  # pylint: disable=protected-access
                            train._example_keys(0, 2, 4))  # pylint: disable=protected-access


def test_the_loop_keys_computed_in_blocks_are_the_example_keys():
  # The training loop takes its keys from blocks computed ahead; a run that
  # resumes mid-block (step 61), crosses blocks and skips ahead gets the
  # same keys as `_example_keys`, step by step.
  step_keys = train._StepKeys(7, 3)  # pylint: disable=protected-access
  block = step_keys.BLOCK
  for step in list(range(61, 2 * block + 3)) + [5 * block - 1, 5 * block]:
    got = step_keys(step)
    assert isinstance(got, np.ndarray) and got.shape == (3, 2), step
    np.testing.assert_array_equal(
        got, train._example_keys(7, step, 3), err_msg=str(step))  # pylint: disable=protected-access
  # Only the block in use and the next one are kept.
  assert sorted(step_keys._blocks) == [5 * block, 6 * block]  # pylint: disable=protected-access
  # The last int32 steps: no block beyond them is computed ahead.
  for step in (2 ** 31 - block - 1, 2 ** 31 - block, 2 ** 31 - 1):
    np.testing.assert_array_equal(
        step_keys(step), train._example_keys(7, step, 3), err_msg=str(step))  # pylint: disable=protected-access


def test_compiled_steps_of_a_placement_are_kept_least_recently_used_first_out():
  parallel = train._Parallel("pmap", 1)  # pylint: disable=protected-access
  get = lambda key: parallel.compile_cached(key, lambda x: x + key,
                                            num_replicated=1)
  first = get(0)
  for key in range(1, train.MAX_CACHED_STEPS):
    get(key)
  assert get(0) is first   # a hit; 0 is now the most recently used
  get(train.MAX_CACHED_STEPS)   # one more: 1, the least recently used, goes
  assert len(parallel._compiled) == train.MAX_CACHED_STEPS  # pylint: disable=protected-access
  assert get(0) is first
  assert 1 not in parallel._compiled  # pylint: disable=protected-access
  # An evicted step is built again, and still computes what it did.
  np.testing.assert_array_equal(get(1)(np.zeros((1, 2), np.float32)),
                                np.ones((1, 2)))


def test_the_state_is_donated_except_under_pmap_on_cpu():
  """`compile(donate_state=True)` on these CPU devices: under pmap XLA
  copied the whole donated state at the start of the step (no memory saved,
  a slower step), so pmap keeps its input; shard_map reuses its buffers."""
  assert jax.default_backend() == "cpu"
  for kind, donated in (("pmap", False), ("shard_map", True)):
    parallel = train._Parallel(kind, 1)  # pylint: disable=protected-access
    total = lambda x: jax.lax.psum(x.sum(), train.AXIS)
    step = parallel.compile(lambda state, x: (state + total(x), total(x)),
                            num_replicated=1, donate_state=True)
    state = parallel.replicate(np.ones(3, np.float32))
    new, _ = step(state, *parallel.shard([np.ones((2,), np.float32)]))
    np.testing.assert_array_equal(parallel.unreplicate(new), 3.0)
    assert state.is_deleted() == donated, kind


# Bad configs, bad data and non-finite steps: tests/reliability_test.py.

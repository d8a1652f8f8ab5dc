"""Tests of experiments/benchmark.py: one tiny run of every workload and sweep.

No timing is asserted (the machine is shared). The FLOP counts are: XLA's
cost analysis counts a loop body once, whatever the trip count, and the
benchmark must count it trip-count times.
"""

import contextlib
import importlib
import io
import json
import math
import os
import sys

from absl import flags
from absl.testing import flagsaver
import jax
from jax import lax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position

# Every workload and every sweep, as small as they go.
_TINY = dict(
    model="tiny_cnn", repeats="1", warmup="0", matmul_size="32", ig_batch="2",
    ig_steps="4", chunk_size="2", pgd_batch="2", pgd_steps="2,4",
    train_batch="2", train_ig_steps="4", train_approx_factor="2",
    train_pgd_steps="2", objectives="natural,madry,ig_norm", attack_batch="1",
    attack_steps="2", attack_restarts="2", attack_ig_steps="4",
    loop_steps="4", loop_log_every="2", sweeps="batch,ig_steps,devices",
    sweep_batch_sizes="1,2", sweep_ig_steps="2,8", sweep_objective="natural")


def _run_main(*extra):
  """Runs the binary's main with `_TINY` and `extra` flags; returns stdout."""
  argv = (["benchmark.py"] + [f"--{k}={v}" for k, v in _TINY.items()]
          + list(extra))
  out = io.StringIO()
  with flagsaver.flagsaver(), contextlib.redirect_stdout(out):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    benchmark.main(["benchmark.py"])
  return out.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("benchmark") / "out" / "bench.json")
  stdout = _run_main("--attack_single", f"--output_json={path}")
  with open(path) as f:
    result = json.load(f)
  return result, stdout


def _records(result, **match):
  return [r for r in result["records"]
          if all(r.get(k) == v for k, v in match.items())]


def _positive(value):
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_workload_and_sweep_point_has_a_complete_record(tiny_run):
  result, _ = tiny_run
  header = result["header"]
  for key, expected in dict(
      jax_version=str, jaxlib_version=str, platform=str, device_kind=str,
      device_count=int, cpu_count=int, hostname=str, date=str,
      settings=dict, flags=dict).items():
    assert isinstance(header[key], expected), (key, header[key])
  assert header["platform"] == "cpu" and header["device_count"] == 4
  # The allocator settings that change CPU timings (BUILD.md, Performance).
  assert header["glibc_tunables"] == os.environ.get("GLIBC_TUNABLES", "")
  assert header["transparent_huge_pages"] == (
      benchmark.transparent_huge_pages())
  if os.path.exists(benchmark.THP_MODE_FILE):
    with open(benchmark.THP_MODE_FILE) as f:
      assert f"[{header['transparent_huge_pages']}]" in f.read()
  assert _positive(result["peak_flops_per_s"])
  counts = {}
  for r in result["records"]:
    counts[(r["workload"], r["sweep"])] = counts.get(
        (r["workload"], r["sweep"]), 0) + 1
  assert counts == {
      ("matmul_peak", None): 1, ("ig", None): 1, ("pgd", None): 2,
      ("train", None): 3, ("attack", None): 2, ("loop", None): 1,
      # tiny_cnn's 4 layers x 5 kernels x 4 batches (1: the attack's
      # example; 2: PGD, the train steps and the attack's 2 restarts; 4:
      # IG's chunks of 2 points x 2 images, IG-NORM's inner IG and the
      # attack's reference IG; 8: IG-NORM's outer IG and the attack's IGs).
      ("kernels", None): 80, ("ig", "batch"): 2,
      ("train", "batch"): 2, ("ig", "ig_steps"): 4, ("train", "devices"): 3}
  for r in result["records"]:
    name = r["name"]
    assert isinstance(name, str) and isinstance(r["flops_method"], str), name
    for key in ("median_s", "min_s", "max_s", "flops", "flops_xla_raw",
                "flops_per_s", "fraction_of_peak", "peak_memory_bytes",
                "peak_memory_mib"):
      assert _positive(r[key]), (name, key, r[key])
    for key in ("lower_s", "compile_s", "flops_analysis_s"):
      assert r[key] >= 0 and math.isfinite(r[key]), (name, key)
    assert r["min_s"] <= r["median_s"] <= r["max_s"]
    # The matmul peak is never measured cold or once (every % divides by it);
    # a kernel is timed once before the workloads and once after them.
    assert r["repeats"] == len(r["times_s"]) == {
        "matmul_peak": 10, "kernels": 2}.get(r["workload"], 1), name
    assert isinstance(r["peak_memory_bytes"], int)
    memory = r["memory"]
    for key in ("argument_size_in_bytes", "output_size_in_bytes",
                "temp_size_in_bytes", "alias_size_in_bytes"):
      assert isinstance(memory[key], int) and memory[key] >= 0, (name, key)
    assert r["peak_memory_bytes"] == (
        memory["argument_size_in_bytes"] + memory["output_size_in_bytes"]
        + memory["temp_size_in_bytes"] - memory["alias_size_in_bytes"])
    if r["workload"] == "matmul_peak":
      assert r["flops"] == r["flops_analytic"] == 2 * 32 ** 3
      assert r["fraction_of_peak"] == 1.0
    else:
      assert _positive(r["examples_per_s"]) and _positive(r["num_examples"])
      assert _positive(r["flops_matmul_jaxpr"]), name
      # XLA's count adds the elementwise work to the convolutions'.
      assert r["flops"] >= r["flops_matmul_jaxpr"], name
    if r["workload"] == "attack":
      assert _positive(r["seconds_per_example"])
    if r["workload"] in ("train", "loop"):
      assert _positive(r["steps_per_s"])
      assert r["hyper"]["num_steps"] == 2 and r["hyper"]["m"] == 4
  single, = _records(result, workload="attack", one_at_a_time=True)
  assert _positive(single["speedup_batched_vs_one_at_a_time"])
  # --attack_batch=1: one at a time is the batched program, not recompiled.
  assert single["compiled_earlier"]


def test_one_at_a_time_record_reports_its_own_chunking(tmp_path,
                                                      monkeypatch):
  """The batch-1 attack chunks its IGs for 1 x restarts rows, not the batch's.

  With 10 images at once, the 2 examples x 2 restarts x 4 points of the
  batched attack (16) are scanned; one example's 8 are unrolled.
  """
  # The module, which the package's function of the same name shadows.
  attribution_attack = importlib.import_module(
      "rar_jax.attacks.attribution_attack")
  monkeypatch.setattr(attribution_attack, "CPU_IMAGES_AT_ONCE", 10)
  path = str(tmp_path / "bench.json")
  _run_main("--workloads=attack", "--attack_batch=2", "--attack_single",
            "--sweeps=", f"--output_json={path}")
  with open(path) as f:
    result = json.load(f)
  batched, = _records(result, workload="attack", one_at_a_time=None)
  single, = _records(result, workload="attack", one_at_a_time=True)
  assert batched["batch"] == single["batch"] == 2
  assert not single["compiled_earlier"]
  for record, rows, unroll in ((batched, 4, False), (single, 2, True)):
    assert (record["chunk_size_used"], record["unroll_chunks"]) == (
        attribution_attack.attack_chunking(rows, 4, "cpu")), record["name"]
    assert record["unroll_chunks"] is unroll


def test_train_steps_under_shard_map_count_their_loops(tmp_path):
  """Under `--parallel=shard_map` a PGD loop's body names the mesh's axis.

  Its FLOPs are counted as under pmap (the body compiled alone used to fail
  with an unbound axis name; IG-NORM's, with a psum of varying values, needs
  the program's device variance).
  """
  path = str(tmp_path / "bench.json")
  # 20 IG points at batch 4 (`_TINY`'s 4 points at batch 2 did not reach
  # the failing psum).
  sizes = ("--train_ig_steps=20", "--train_approx_factor=5",
           "--train_batch=4")
  _run_main("--workloads=train", "--objectives=madry,ig_norm",
            "--parallel=shard_map", *sizes, "--sweeps=",
            f"--output_json={path}")
  with open(path) as f:
    result = json.load(f)
  pmap_path = str(tmp_path / "pmap.json")
  _run_main("--workloads=train", "--objectives=madry,ig_norm", *sizes,
            "--sweeps=", f"--output_json={pmap_path}")
  with open(pmap_path) as f:
    pmap_result = json.load(f)
  for objective in ("madry", "ig_norm"):
    sharded, = _records(result, workload="train", objective=objective)
    pmapped, = _records(pmap_result, workload="train", objective=objective)
    assert sharded["parallel"] == "shard_map" != pmapped["parallel"]
    assert sharded["flops_method"] == pmapped["flops_method"] == (
        "xla_cost_analysis+loop_bodies_x_trip_count")
    assert sharded["flops_matmul_jaxpr"] == pmapped["flops_matmul_jaxpr"]
    assert sharded["flops"] == pytest.approx(pmapped["flops"], rel=0.02)


def test_loop_times_the_trainer_against_its_step_alone(tiny_run):
  result, _ = tiny_run
  loop, = _records(result, workload="loop")
  # 4 steps logged every 2: the first window (it compiles) is not timed.
  assert loop["steps_run"] == 4 and loop["objective"] == "natural"
  assert loop["repeats"] == len(loop["times_s"]) == 1
  assert _positive(loop["first_window_s"]) and _positive(loop["trainer_wall_s"])
  # The step alone once before the trainer and once after it.
  assert len(loop["step_alone_times_s"]) == 2
  assert _positive(loop["step_alone_s"]) and _positive(loop["loop_efficiency"])
  assert loop["loop_efficiency"] == pytest.approx(
      loop["step_alone_s"] / loop["median_s"])
  assert loop["loop_overhead_ms_per_step"] == pytest.approx(
      1e3 * (loop["median_s"] - loop["step_alone_s"]))
  # The step alone is the train workload's program, compiled once.
  natural, = _records(result, workload="train", objective="natural",
                      sweep=None)
  assert loop["compiled_earlier"] and loop["flops"] == natural["flops"]
  assert loop["examples_per_s"] == pytest.approx(2 / loop["median_s"])


def test_kernel_floors_count_the_layers_each_program_runs(tiny_run):
  result, stdout = tiny_run
  kernels = _records(result, workload="kernels")
  by_key = {(r["batch"], r["layer"], r["op"]): r for r in kernels}
  assert len(by_key) == len(kernels) == 80
  for batch in (1, 2, 4, 8):
    assert [r["layer"] for r in kernels
            if r["batch"] == batch and r["op"] == "forward"] == [
                "conv1", "conv2", "fc1", "fc2"]
  conv2 = by_key[(4, "conv2", "kernel_grad")]
  assert conv2["input_shape"] == [4, 14, 14, 2]
  assert conv2["kernel_shape"] == [3, 3, 2, 4]
  assert conv2["calls_per_timing"] == benchmark.KERNEL_CALLS

  def sums(field, batch, f=0, b=0, b1=0, k=0, t=0, t1=0, kb=0):
    """f F + b B + b1 B1 + k K + t T + t1 T1 + kb KB: the layers' `field`."""
    total = 0.0
    for (bt, layer, op), r in by_key.items():
      if bt == batch:
        coef = dict(forward=f, input_grad=b, kernel_grad=k,
                    input_grad_transpose=t, input_grad_kernel_grad=kb)[op]
        if op == "input_grad" and layer == "conv1":
          coef += b1
        if op == "input_grad_transpose" and layer == "conv1":
          coef += t1
        total += coef * r[field]
    return total

  # The terms, written out here for _TINY's settings: batch 2 (IG: chunks of
  # 2 points x 2 images), IG 4 points, PGD 2 and 4 steps, Madry 2 PGD steps.
  expected = {
      "ig B=2 m=4 chunk=2": [(2, 4, dict(f=1, b=1))],
      "pgd B=2 steps=2": [(2, 2, dict(f=1, b=1))],
      "pgd B=2 steps=4": [(4, 2, dict(f=1, b=1))],
      "train natural B=2": [(1, 2, dict(f=1, b=1, b1=-1, k=1))],
      "train madry B=2": [(2, 2, dict(f=1, b=1)), (1, 2, dict(f=1)),
                          (1, 2, dict(f=1, b=1, b1=-1, k=1))],
      # IG-NORM, m 4 / approx_factor 2: 2 PGD steps on the gradient of an
      # input gradient at 2 points (one chunk of 2 x 2 images: F, B, then
      # the transposes of B and B again); the gradient of IG_4 in the
      # parameters (one chunk of 4 x 2: also the kernel gradients of B's
      # and F's ops, and no B1 for F's); the clean loss's gradient; the
      # adversarial forward. The first layer's transpose, T1, is counted
      # once per chunk size (here each IG is one chunk).
      "train ig_norm B=2": [(2, 4, dict(f=1, b=2, t=1, t1=-1)),
                            (2, 4, dict(t1=1)),
                            (1, 8, dict(f=1, b=2, b1=-1, t=1, t1=-1, kb=1,
                                        k=1)),
                            (1, 8, dict(t1=1)),
                            (1, 2, dict(f=1, b=1, b1=-1, k=1)),
                            (1, 2, dict(f=1))],
      # The attack, 1 example x 2 restarts, 4 IG points in one chunk (2
      # steps): each step the gradient of the surrogate's IG in the input,
      # the network's IG and its forward on the 2 rows; the reference IG
      # and the final forward of the example.
      "attack B=1": [(2, 8, dict(f=1, b=2, t=1, t1=-1)), (2, 8, dict(t1=1)),
                     (2, 8, dict(f=1, b=1)), (2, 2, dict(f=1)),
                     (1, 4, dict(f=1, b=1)), (1, 1, dict(f=1))],
  }
  floored = {r["name"]: r for r in result["records"]
             if "kernel_floor_s" in r}
  # Not the sweeps, not the attack one example at a time.
  assert set(floored) == set(expected)
  # The kernels were timed (before the workloads ran) at the batches the
  # records' terms need, no more.
  assert {r["batch"] for r in kernels} == {
      t["batch"] for r in floored.values() for t in r["kernel_floor_terms"]}
  for name, terms in expected.items():
    r = floored[name]
    floor = sum(n * sums("median_s", batch, **c) for n, batch, c in terms)
    assert r["kernel_floor_s"] == pytest.approx(floor, rel=1e-9), name
    assert r["over_kernel_floor"] == pytest.approx(r["median_s"] / floor)
    # The mathematics of the count: the same terms applied to the layers'
    # FLOPs give the FLOPs of the convolutions and matmuls the program runs
    # (its jaxpr's), less what the floor leaves out on purpose: the train
    # step's adversarial logits for its metrics repeat a counted forward, and
    # IG's weighted sum of the points is no layer.
    flops = sum(n * sums("flops_matmul_jaxpr", batch, **c)
                for n, batch, c in terms)
    if r["workload"] == "train":
      flops += sums("flops_matmul_jaxpr", 2, f=1)
    if r["workload"] in ("ig", "attack") or r.get("objective") == "ig_norm":
      # IG's weighted sums (and their transposes) add 1.0-1.3 % here: the
      # program has at least the floor's FLOPs and less than 2 % more. (The
      # smallest term, a forward, is 2.3 % of IG-NORM's.)
      assert 0 <= r["flops_matmul_jaxpr"] - flops <= 0.02 * flops, name
    else:
      assert r["flops_matmul_jaxpr"] == pytest.approx(flops, rel=1e-6), name
  assert "kernels alone" in stdout


def test_kernels_are_timed_before_and_after_the_workloads(tmp_path,
                                                        monkeypatch):
  """With 3 repeats, 2 of each kernel's timings come before the workloads'
  and 1 after them, and its record holds all 3."""
  calls, run_timed = [], benchmark._run_timed

  def spy(call, warmup, repeats):
    calls.append(repeats)
    return run_timed(call, warmup, repeats)

  monkeypatch.setattr(benchmark, "_run_timed", spy)
  path = str(tmp_path / "bench.json")
  _run_main("--workloads=pgd,kernels", "--repeats=3", "--pgd_steps=2",
            "--sweeps=", f"--output_json={path}")
  with open(path) as f:
    kernels = _records(json.load(f), workload="kernels")
  n = len(kernels)     # 4 layers x 5 ops at each batch the settings plan
  assert n >= 20 and n % 20 == 0
  # The matmul peak, then n kernels before, PGD, then n kernels after.
  assert calls[-n:] == [1] * n
  assert calls[-2 * n - 1:-n] == [2] * n + [3]
  assert all(len(r["times_s"]) == r["repeats"] == 3 for r in kernels)


@pytest.mark.parametrize("repeats, before, after",
                         [(1, 1, 1), (2, 1, 1), (3, 2, 1), (4, 2, 2)])
def test_repeats_split_around_what_is_compared(repeats, before, after):
  assert benchmark._split_repeats(repeats) == (before, after)


def test_kernel_floor_terms_of_the_inner_maximisations():
  # IG-NORM, m 50 / approx_factor 5, 40 PGD steps, batch 50, on CPU: the
  # inner IG of 10 points in unrolled chunks of 1 point (50 images), the
  # outer IG of 50 points in chunks of 1 point.
  record = dict(workload="train", batch=50, num_devices=1,
                objective="ig_norm",
                hyper=dict(num_steps=40, m=50, approx_factor=5))
  terms = benchmark.kernel_floor_terms(record, platform="cpu")
  as_tuples = [(t["times"], t["batch"], t["forward"], t["input_grad"],
                t["first_input_grad"], t["kernel_grad"]) for t in terms]
  assert as_tuples == [(400, 50, 1, 2, 0, 0), (40, 50, 0, 0, 0, 0),
                       (50, 50, 1, 2, -1, 1), (1, 50, 0, 0, 0, 0),
                       (1, 50, 1, 1, -1, 1), (1, 50, 1, 0, 0, 0)]
  # The first layer's transpose of its input gradient (T1) once per PGD
  # step and once for the outer gradient, not once per IG point: its input,
  # the cotangent of the input gradients, is the same at every point.
  assert [(t["input_grad_transpose"], t["first_input_grad_transpose"],
           t["input_grad_kernel_grad"]) for t in terms] == [
               (1, -1, 0), (0, 1, 0), (1, -1, 1), (0, 1, 0), (0, 0, 0),
               (0, 0, 0)]
  # IG-SUM-NORM adds the loss's input gradient to every PGD step; on a GPU
  # every IG takes all its points at once.
  record.update(objective="ig_sum_norm")
  terms = benchmark.kernel_floor_terms(record, platform="gpu")
  as_tuples = [(t["times"], t["batch"], t["forward"], t["input_grad"],
                t["first_input_grad_transpose"]) for t in terms]
  assert as_tuples[:5] == [(40, 500, 1, 2, -1), (40, 500, 0, 0, 1),
                           (40, 50, 1, 1, 0), (1, 2500, 1, 2, -1),
                           (1, 2500, 0, 0, 1)]
  # 41 inner points in 14 unrolled chunks: 13 of 3 points and a last one of
  # 2; T1 once per PGD step at each of the two chunk batches.
  record.update(objective="ig_norm", hyper=dict(num_steps=40, m=41,
                                                approx_factor=1))
  terms = benchmark.kernel_floor_terms(record, platform="cpu")
  assert [(t["times"], t["batch"], t["input_grad_transpose"],
           t["first_input_grad_transpose"]) for t in terms[:4]] == [
               (520, 150, 1, -1), (40, 100, 1, -1), (40, 150, 0, 1),
               (40, 100, 0, 1)]
  # Chunks that do not divide the points leave a last, smaller chunk; a
  # chunk of more points than there are is all of them.
  ig = dict(workload="ig", batch=4, ig_steps=10, chunk_size_used=3)
  assert [(t["times"], t["batch"]) for t in
          benchmark.kernel_floor_terms(ig)] == [(3, 12), (1, 4)]
  ig.update(chunk_size_used=16)
  assert [(t["times"], t["batch"]) for t in
          benchmark.kernel_floor_terms(ig)] == [(1, 40)]
  # On several devices, or for other workloads, there is no floor.
  assert benchmark.kernel_floor_terms(dict(record, num_devices=2)) is None
  assert benchmark.kernel_floor_terms(dict(workload="loop")) is None


def test_kernel_floor_terms_of_the_attack(monkeypatch):
  # The paper's attack on CPU: 4 examples x 3 restarts, 100 steps, 100 IG
  # points in unrolled chunks of 5 (60 images).
  record = dict(workload="attack", batch=4, attack_steps=100,
                attack_restarts=3, attack_ig_steps=100, chunk_size_used=5,
                unroll_chunks=True)
  terms = benchmark.kernel_floor_terms(record)
  as_tuples = [(t["times"], t["batch"], t["forward"], t["input_grad"],
                t["input_grad_transpose"], t["first_input_grad_transpose"])
               for t in terms]
  assert as_tuples == [
      # Each step: the gradient of the surrogate's IG in the input, 20
      # chunks with T1 once; the network's IG; its forward (the label).
      (2000, 60, 1, 2, 1, -1), (100, 60, 0, 0, 0, 1),
      (2000, 60, 1, 1, 0, 0), (100, 12, 1, 0, 0, 0),
      # The reference IG of the 4 examples in the same chunks; their
      # forward (the attacked mask).
      (20, 20, 1, 1, 0, 0), (1, 4, 1, 0, 0, 0)]
  # No gradient in the parameters: neither B1 nor kernel gradients.
  assert all(t["first_input_grad"] == t["kernel_grad"]
             == t["input_grad_kernel_grad"] == 0 for t in terms)
  # Unrolled chunks that do not divide the points (7 of 100: 14 of 7 and
  # one of 2) give T1 at both batches.
  record.update(chunk_size_used=7)
  terms = benchmark.kernel_floor_terms(record)
  assert [(t["times"], t["batch"]) for t in terms[:4]] == [
      (1400, 84), (100, 24), (100, 84), (100, 24)]
  # Scanned chunks (an explicit chunk size, or more rows than the attack
  # unrolls) compute T1 in every chunk inside the step loop.
  record.update(unroll_chunks=False)
  terms = benchmark.kernel_floor_terms(record)
  assert [(t["times"], t["batch"], t["input_grad_transpose"],
           t["first_input_grad_transpose"]) for t in terms[:3]] == [
               (1400, 84, 1, 0), (100, 24, 1, 0), (1400, 84, 0, 0)]
  # All points at once: one chunk, T1 once either way.
  for unroll in (False, True):
    record.update(chunk_size_used=None, unroll_chunks=unroll)
    terms = benchmark.kernel_floor_terms(record)
    assert [(t["times"], t["batch"]) for t in terms if t["forward"]] == [
        (100, 1200), (100, 1200), (100, 12), (1, 400), (1, 4)]
    assert sum(t["times"] * t["first_input_grad_transpose"]
               for t in terms) == 0
    assert sum(t["times"] * t["input_grad_transpose"] for t in terms) == 100
  # The chunks `_attack_sizes` reports for a run, as the attack takes them:
  # on CPU, 12 rows x 100 points unrolled in chunks of 5; 60 rows, beyond
  # `CPU_IMAGES_AT_ONCE`, scanned in chunks of 1; --attack_chunk_size
  # scanned.
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  for batch, chunk, expected in ((4, None, (5, True)), (20, None, (1, False)),
                                 (4, 7, (7, False))):
    sizes = benchmark._attack_sizes(
        benchmark.Settings(attack_chunk_size=chunk), batch)
    assert (sizes["chunk_size_used"], sizes["unroll_chunks"]) == expected
  # One example at a time (4 runs of a batch-1 program): no floor.
  assert benchmark.kernel_floor_terms(
      dict(record, one_at_a_time=True)) is None


def test_kernel_floor_prices_the_first_transpose_once_per_gradient(
    monkeypatch):
  """IG-NORM at the paper's settings on CPU, from made-up kernel timings.

  The tiny run's IGs are one chunk each, where T1's two terms cancel; here
  the inner IG has 10 chunks and the outer 50, so the floor holds T1 41
  times against 450 for every other layer's transpose.
  """
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  ops = dict(zip(benchmark.KERNEL_OPS, (1.0, 2.0, 3.0, 5.0, 7.0)))
  layers = (1e-3, 1e-4, 1e-5, 1e-6)   # conv1's ops dominate each sum
  kernels = [dict(batch=50, layer_index=i, op=op, median_s=scale * v)
             for i, scale in enumerate(layers) for op, v in ops.items()]
  total = {op: sum(scale * v for scale in layers) for op, v in ops.items()}
  f, b, k, t, kb = (total[op] for op in benchmark.KERNEL_OPS)
  b1, t1 = layers[0] * ops["input_grad"], layers[0] * ops[
      "input_grad_transpose"]
  record = dict(workload="train", batch=50, num_devices=1,
                objective="ig_norm", median_s=10.0,
                hyper=dict(num_steps=40, m=50, approx_factor=5))
  benchmark.attach_kernel_floors([record], kernels)
  floor = (400 * (f + 2 * b + t - t1) + 40 * t1          # the PGD steps
           + 50 * (f + 2 * b - b1 + t - t1 + kb + k) + t1  # the outer IG
           + (f + b - b1 + k) + f)        # the clean loss; adversarial logits
  assert record["kernel_floor_s"] == pytest.approx(floor, rel=1e-12)
  assert record["over_kernel_floor"] == pytest.approx(10.0 / floor)
  # Counted at every point, T1 would add 409 of conv1's transposes.
  assert floor + 409 * t1 > 1.1 * floor


def test_json_file_matches_the_flags_and_the_printed_table(tiny_run):
  result, stdout = tiny_run
  settings = result["header"]["settings"]
  assert settings["model"] == "tiny_cnn"
  assert settings["pgd_steps"] == [2, 4]
  assert settings["sweeps"] == ["batch", "ig_steps", "devices"]
  assert settings["workloads"] == list(benchmark.WORKLOADS)
  assert settings["attack_single"] is True
  given = result["header"]["flags"]
  assert given["pgd_steps"] == ["2", "4"] and given["attack_single"] is True
  assert given["output_json"].endswith("bench.json")
  lines = stdout.splitlines()
  assert "matmul peak" in lines[0] and lines[1].startswith("workload")
  rows = lines[3:]
  assert len(rows) == len(result["records"])
  for row, r in zip(rows, result["records"]):
    assert row.startswith(r["name"][:42]), (row, r["name"])
    assert f"{r['compile_s']:.3f}" in row


def test_chunked_ig_needs_less_memory_for_the_same_flops(tiny_run):
  result, _ = tiny_run
  plain, = _records(result, sweep="ig_steps", ig_steps=8, chunk_size=None)
  chunked, = _records(result, sweep="ig_steps", ig_steps=8, chunk_size=2)
  assert (chunked["memory"]["temp_size_in_bytes"]
          <= plain["memory"]["temp_size_in_bytes"])
  # A scan over 4 chunks: XLA's own count sees one chunk, the benchmark four.
  assert plain["flops_method"] == "xla_cost_analysis"
  assert "loop_bodies_x_trip_count" in chunked["flops_method"]
  assert chunked["flops_xla_raw"] < 0.5 * plain["flops_xla_raw"]
  assert chunked["flops"] == pytest.approx(plain["flops"], rel=0.05)
  assert chunked["flops_matmul_jaxpr"] == pytest.approx(
      plain["flops_matmul_jaxpr"], rel=1e-3)


def test_ig_and_pgd_flops_match_the_analytic_count(tiny_run):
  result, _ = tiny_run
  analytic = result["header"]["analytic_flops_per_example"]
  # A forward pass and an input gradient per point, conv taps in bounds
  # (tiny_cnn's convs, 1 -> 2 -> 4 channels, are too narrow for
  # `models._conv_few_outputs`: see the next test).
  assert analytic["few_channel_out_of_bounds"] == 0
  per_point = (2 * analytic["forward_in_bounds"]
               + analytic["few_channel_out_of_bounds"])
  for r in _records(result, workload="pgd"):
    points = r["batch"] * r["pgd_steps"]
    assert r["flops_matmul_jaxpr"] == points * per_point, r["name"]
  for r in _records(result, workload="ig"):
    # IG adds the quadrature's weighted sum (2 FLOPs per pixel and point;
    # 1 for a chunk of one point, not the tiny run's chunks of 2)
    # and computes the last layer's input gradient of the label logit, the
    # same at every point, once per chunk.
    points = r["batch"] * r["ig_steps"]
    assert r["flops_matmul_jaxpr"] == pytest.approx(
        points * (per_point + 2 * 28 * 28), rel=0.01), r["name"]
    assert r["flops_analytic"] == points * 2 * analytic["forward"]
    assert r["flops_over_analytic"] == pytest.approx(
        r["flops"] / r["flops_analytic"])


def test_few_channel_input_gradients_count_every_tap():
  """mnist_cnn's conv1 (1 -> 32 channels) input gradient is a matmul over all
  25 taps (`models._conv_few_outputs`); its jaxpr, not compiled, says so."""
  analytic = benchmark.analytic_flops("mnist_cnn", (28, 28, 1))
  # 5x5 SAME at 28: 28 * 5 - (2 + 1) * 2 = 134 taps in bounds per axis.
  assert analytic["few_channel_out_of_bounds"] == 2 * 32 * (
      28 * 28 * 25 - 134 * 134)
  init_fn, apply_fn, _ = benchmark.models.make_apply_fns("mnist_cnn",
                                                         num_classes=10)
  x = jnp.zeros((1, 28, 28, 1))
  params = jax.eval_shape(init_fn, jax.random.key(0), x)
  # As PGD's cross-entropy: the logits are used, not only their gradient.
  grad = jax.grad(lambda x, p: jax.nn.logsumexp(apply_fn(p, x)).sum())
  jaxpr = jax.make_jaxpr(grad)(x, params).jaxpr
  assert benchmark.matmul_flops_from_jaxpr(jaxpr) == (
      2 * analytic["forward_in_bounds"] + analytic["few_channel_out_of_bounds"])


def test_a_jit_call_does_not_keep_its_unused_results_inputs_alive():
  """A matmul that only a `jit` call's unused result needs is dead, as in
  conv1's matmul-form input gradient differentiated in its cotangent,
  whose `_pad` call returns the padded primal (unused) and the padding
  value (used by the transpose)."""
  def f(a, b, c):
    k = a @ b
    _, doubled = jax.jit(lambda k, c: (jnp.pad(k, 1), 2.0 * c))(k, c)
    return doubled, c @ b                        # the second matmul is live
  a, b, c = jnp.ones((8, 16)), jnp.ones((16, 4)), jnp.ones((3, 16))
  jaxpr = jax.make_jaxpr(f)(a, b, c).jaxpr
  assert benchmark.matmul_flops_from_jaxpr(jaxpr) == 2 * 3 * 16 * 4
  # XLA drops the dead matmul too (its count adds the doubling).
  xla = benchmark._xla_flops(jax.jit(f).lower(a, b, c).compile())
  assert 2 * 3 * 16 * 4 <= xla < 2 * 8 * 16 * 4


@pytest.mark.parametrize("batch", [1, 2])
def test_a_matmul_over_one_element_is_a_product(batch):
  """A dense layer's kernel gradient contracts the batch: at batch 1 it is an
  outer product, 1 FLOP per output in XLA's count and in the jaxpr's."""
  f = lambda w, x: jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w)
  w, x = jnp.ones((196, 8)), jnp.ones((batch, 196))
  matmul = benchmark.matmul_flops_from_jaxpr(jax.make_jaxpr(f)(w, x).jaxpr)
  kernel_grad = 196 * 8 * (1 if batch == 1 else 2 * batch)
  assert matmul == batch * 2 * 196 * 8 + kernel_grad
  # XLA's count adds tanh's elementwise work, 3 FLOPs per logit here.
  xla = benchmark._xla_flops(jax.jit(f).lower(w, x).compile())
  assert matmul <= xla <= matmul + 3 * batch * 8


def test_flops_of_a_loop_scale_with_its_trip_count(tiny_run):
  result, _ = tiny_run
  f = {r["pgd_steps"]: r for r in _records(result, workload="pgd")}
  # XLA's own count does not see the trip count...
  assert f[2]["flops_xla_raw"] == pytest.approx(f[4]["flops_xla_raw"],
                                                rel=1e-3)
  # ... the benchmark's does: about twice the FLOPs for twice the steps (the
  # random start is a constant part), exactly for the convolutions.
  assert 1.7 < f[4]["flops"] / f[2]["flops"] <= 2.0
  assert f[4]["flops_matmul_jaxpr"] == 2 * f[2]["flops_matmul_jaxpr"]
  # Data-parallel steps count every device.
  dev = {r["num_devices"]: r for r in _records(result, sweep="devices")}
  assert sorted(dev) == [1, 2, 4]
  assert dev[4]["flops"] == pytest.approx(4 * dev[1]["flops"], rel=0.01)
  assert dev[1]["scaling_efficiency"] == 1.0
  assert all(_positive(r["scaling_efficiency"]) for r in dev.values())
  # The second record of a program reuses its compiled executable.
  assert dev[1]["compiled_earlier"] and not dev[2]["compiled_earlier"]


def test_xla_counts_a_loop_body_once_and_count_flops_corrects_it():
  n, trips = 32, 7
  a = jnp.ones((n, n))
  one_matmul = 2 * n ** 3

  def loop(a, unroll=1):
    return lax.fori_loop(0, trips, lambda i, x: x @ a, a, unroll=unroll)

  for unroll in (1, 3, trips):
    fn = jax.jit(lambda a, u=unroll: loop(a, u))
    counted = benchmark.count_flops(fn, (a,), fn.lower(a).compile())
    # XLA sees the copies in the loop body (and the remainder) once each.
    copies = unroll + trips % unroll if unroll < trips else trips
    assert counted["flops_xla_raw"] == pytest.approx(copies * one_matmul,
                                                     rel=0.01)
    assert counted["flops"] == pytest.approx(trips * one_matmul, rel=0.01)
    assert counted["flops_matmul_jaxpr"] == trips * one_matmul
  # Nested loops multiply.
  nested = jax.jit(lambda a: lax.fori_loop(0, 3, lambda i, x: loop(x), a))
  counted = benchmark.count_flops(nested, (a,), nested.lower(a).compile())
  assert counted["flops_xla_raw"] == pytest.approx(one_matmul, rel=0.01)
  assert counted["flops"] == pytest.approx(3 * trips * one_matmul, rel=0.01)


@pytest.mark.parametrize("changes, message", [
    (dict(workloads=("ig", "fgsm")),
     r"--workloads=ig,fgsm has unknown name\(s\) \['fgsm'\]; accepted: "
     "matmul_peak, ig, pgd, train, attack, loop"),
    (dict(sweeps=("steps",)), r"--sweeps=steps has unknown name"),
    (dict(objectives=("ig",)), r"--objectives=ig has unknown name"),
    (dict(model="resnet"), r"--model=resnet has unknown name"),
    (dict(parallel="xmap"), r"accepted: pmap, shard_map"),
    (dict(repeats=0), r"--repeats=0 is not accepted; it must be an int >= 1"),
    (dict(warmup=-1), r"--warmup=-1 is not accepted; it must be an int >= 0"),
    (dict(chunk_size=0), r"--chunk_size=0 is not accepted; .* \(or unset\)"),
    (dict(ig_steps=(4, 0)), r"--ig_steps=4,0 has 0, which is not accepted"),
    (dict(pgd_steps=()), r"--pgd_steps is empty"),
    (dict(train_ig_steps=4, train_approx_factor=3),
     r"--train_approx_factor=3 does not divide --train_ig_steps=4; "
     r"accepted: a divisor of it \(\[1, 2, 4\]\)"),
    (dict(loop_objective="ig"), r"--loop_objective=ig has unknown name"),
    (dict(loop_steps=150, loop_log_every=100),
     r"--loop_steps=150 is not accepted with --loop_log_every=100; accepted: "
     "a multiple of it, at least twice it"),
    (dict(loop_steps=50), r"--loop_steps=50 is not accepted with "
     "--loop_log_every=50"),
    (dict(data_npz="/nonexistent/mnist.npz"),
     r"--data_npz='/nonexistent/mnist.npz' is not a file"),
])
def test_bad_settings_raise_one_clear_line(changes, message):
  with pytest.raises(ValueError, match=message) as err:
    benchmark.check_settings(benchmark.Settings(**changes))
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("flag, message", [
    ("--ig_steps=4,x", "--ig_steps=4,x has 'x', not an int"),
    ("--workloads=ig,nope", "--workloads=ig,nope has unknown name"),
    ("--attack_batch=0", "--attack_batch=0 is not accepted"),
])
def test_the_binary_exits_with_the_message(flag, message):
  with pytest.raises(SystemExit) as err:
    _run_main(flag)
  assert str(err.value).startswith("benchmark.py: error: ")
  assert message in str(err.value) and "\n" not in str(err.value)


def test_transparent_huge_pages_reads_the_active_mode(tmp_path):
  for text, mode in (("always [madvise] never\n", "madvise"),
                     ("[always] madvise never\n", "always"),
                     ("always madvise [never]\n", "never"),
                     ("garbled\n", None)):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert benchmark.transparent_huge_pages(str(path)) == mode, text
  assert benchmark.transparent_huge_pages(str(tmp_path / "missing")) is None

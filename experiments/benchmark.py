r"""Benchmarks rar_jax on the device JAX sees: CPU, GPU or TPU (absl binary).

  python -m experiments.benchmark --output_json=/tmp/benchmark.json
  python -m experiments.benchmark --workloads=ig,pgd --repeats=3 \
      --sweeps=batch,ig_steps,devices --output_json=/tmp/benchmark.json

The defaults are the paper's MNIST settings on `mnist_cnn` (spec Sec. 3.2,
4.2; `experiments/configs/paper.py`) with random parameters (fixed seed:
throughput does not depend on training) and real digits (the embedded MNIST
sample, or --data_npz). Workloads (--workloads, default all):

  matmul_peak  jnp.dot of two square float32 matrices, default precision (as
               the workloads): the measured FLOP/s peak that every other
               record's `fraction_of_peak` divides by (always measured).
  ig           Integrated Gradients of the label logit, batch 64, 100 and 50
               points (--ig_steps), optionally in chunks (--chunk_size).
  pgd          L-inf PGD on the cross-entropy: eps 0.3, step 0.01, 40 steps,
               random start, batch 50.
  train        one `rar_jax.train.train_step` (loss, gradient, Adam update)
               per objective (--objectives): batch 50, m = 50 IG points,
               approx_factor 5, 40 PGD steps.
  attack       the top-k attribution attack (k_top 200, eval_k 100): 100
               steps x 3 restarts, 100 IG points, seconds per example; with
               --attack_single also one example at a time, and the speed-up.
  loop         `rar_jax.train.train_and_evaluate` itself, --loop_steps steps
               of --loop_objective (default NATURAL) at --train_batch on one
               device, against its step alone: the trainer's per-step cost
               (data, keys, placement, checks) beyond the compiled step.
  kernels      every conv and dense layer's forward, input gradient and
               kernel gradient alone, and the input gradient's transpose
               and kernel gradient (which a gradient of an input gradient
               runs; the layer's own function without its bias,
               `KERNEL_CALLS` calls back to back per timing; half
               the repeats before the other workloads, half after, and at
               least one timing on each side), at the batches the ig, pgd,
               train and attack records run them; those records then get
               `kernel_floor_s`, the time their layers' kernels would take
               alone, and `over_kernel_floor` (median / floor; see
               `kernel_floor_terms`).

Sweeps (--sweeps): `batch` (ig and a train step of --sweep_objective over
--sweep_batch_sizes), `ig_steps` (ig over --sweep_ig_steps without and with
chunking; compare `temp_size_in_bytes`), `devices` (the data-parallel train
step of `rar_jax.train` on 1, 2, 4, ... devices, --train_batch per device;
steps/s and scaling efficiency against 1 device). On CPU, try the devices
sweep with XLA_FLAGS=--xla_force_host_platform_device_count=4 (fake devices
share the cores: it checks the machinery, not the scaling).

Each record has the lowering and compile times (a program that two records
share is compiled once: `compiled_earlier`), `--warmup` untimed and
`--repeats` timed runs (median, min, max seconds; a kernel and the loop's
step alone at least 2, one on each side), examples/s (seconds per
example for the attack; steps/s for train steps), FLOPs, the achieved FLOP/s
and its `fraction_of_peak` (of the peak times the devices used), and
`compiled.memory_analysis()` (`memory`, per device; `peak_memory_bytes` =
argument + output + temp - alias; XLA's own live-range peak is
`memory.peak_memory_in_bytes` where the backend reports it).

FLOPs: XLA's cost analysis counts the body of a loop once, whatever its trip
count (a `lax.fori_loop` of N matmuls reports the FLOPs of one). Programs with
loops (PGD, the attack, chunked IG, the training steps) therefore add, for
every `scan`, the cost analysis of its body compiled on its own times its
trip count, less what XLA counted (`flops_method` says which; the raw count
is `flops_xla_raw`). `flops_matmul_jaxpr` counts the live convolutions and
matmuls of the jaxpr (trip counts included, padding taps not), a lower bound
independent of XLA; for `MnistCNN`-family models the ig and pgd records also
compare with the hand count of the module's `analytic_flops`
(`flops_over_analytic`, about 0.89 on mnist_cnn: XLA skips padding taps).
Prints a table and writes the header and records as JSON (--output_json).
The header has the versions, the device, the host, the date, the settings
and flags, `XLA_FLAGS`, and the allocator's settings that changed CPU
timings here: `GLIBC_TUNABLES` and the kernel's transparent-huge-page mode
(BUILD.md, Performance).
"""

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

# `experiments.configs` must be importable when this file is run as a script.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.extend.core as jax_core  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import jaxlib  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments.configs import paper  # pylint: disable=g-import-not-at-top,wrong-import-position
from rar_jax import data as data_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from rar_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from rar_jax import objectives  # pylint: disable=g-import-not-at-top,wrong-import-position
from rar_jax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
from rar_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from rar_jax import vma as vma_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from rar_jax.attacks import attack_chunking  # pylint: disable=g-import-not-at-top,wrong-import-position
from rar_jax.attacks import attribution_attack  # pylint: disable=g-import-not-at-top,wrong-import-position
from rar_jax.attacks import pgd  # pylint: disable=g-import-not-at-top,wrong-import-position
from rar_jax.attribution import auto_chunk_size  # pylint: disable=g-import-not-at-top,wrong-import-position
from rar_jax.attribution import integrated_gradients  # pylint: disable=g-import-not-at-top,wrong-import-position
from rar_jax.attribution import unrolled_chunk_size  # pylint: disable=g-import-not-at-top,wrong-import-position

WORKLOADS = ("matmul_peak", "ig", "pgd", "train", "attack", "loop",
             "kernels")
SWEEPS = ("batch", "ig_steps", "devices")
TRAIN_OBJECTIVES = ("natural", "madry", "trades", "ig_norm", "ig_sum_norm")
NUM_CLASSES = 10
# Chunk size of the ig_steps sweep's chunked runs when --chunk_size is unset.
DEFAULT_SWEEP_CHUNK = 10
_MIB = 2.0 ** 20


@dataclasses.dataclass
class Settings:
  """What to run; the defaults are the paper's MNIST settings.

  None for `matmul_size` and `attack_batch` picks a size for the platform
  (CPU: 2048 and 4; GPU/TPU: 8192 and 32).
  """
  workloads: Sequence[str] = WORKLOADS
  model: str = "mnist_cnn"
  repeats: int = 5
  warmup: int = 1
  matmul_size: Optional[int] = None
  ig_batch: int = 64
  ig_steps: Sequence[int] = (100, 50)
  chunk_size: Optional[int] = None
  pgd_batch: int = 50
  pgd_steps: Sequence[int] = (40,)
  train_batch: int = 50
  train_ig_steps: int = 50
  train_approx_factor: int = 5
  train_pgd_steps: int = 40
  objectives: Sequence[str] = TRAIN_OBJECTIVES
  attack_batch: Optional[int] = None
  attack_steps: int = 100
  attack_restarts: int = 3
  attack_ig_steps: int = 100
  attack_single: bool = False
  attack_chunk_size: Optional[int] = None
  loop_objective: str = "natural"
  loop_steps: int = 300
  loop_log_every: int = 50
  sweeps: Sequence[str] = ()
  sweep_batch_sizes: Sequence[int] = (1, 8, 32, 64, 128)
  sweep_ig_steps: Sequence[int] = (10, 25, 50, 100, 200)
  sweep_objective: str = "ig_norm"
  parallel: str = "pmap"
  data_npz: Optional[str] = None
  rng_seed: int = 0


# --- Checking the settings (one clear line per bad value). -------------------


def _check_int(name, value, minimum, *, allow_none=False):
  if allow_none and value is None:
    return
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < minimum):
    raise ValueError(
        f"--{name}={value!r} is not accepted; it must be an int >= {minimum}"
        + (" (or unset)" if allow_none else "") + ".")


def _check_names(name, values, accepted, *, allow_empty=False):
  values = list(values)
  if not values and not allow_empty:
    raise ValueError(f"--{name} is empty; accepted: a comma-separated list "
                     f"of {', '.join(accepted)}.")
  unknown = [v for v in values if v not in accepted]
  if unknown:
    raise ValueError(f"--{name}={','.join(map(str, values))} has unknown "
                     f"name(s) {unknown}; accepted: {', '.join(accepted)}.")


def check_settings(s: Settings) -> None:
  """Raises a one-line ValueError naming the first bad setting (flag).

  Args:
    s: the settings.

  Raises:
    ValueError: an unknown workload, sweep, objective, model or parallel
      kind, a size or count out of range, `train_approx_factor` not dividing
      `train_ig_steps`, a missing --data_npz file.
  """
  _check_names("workloads", s.workloads, WORKLOADS)
  _check_names("sweeps", s.sweeps, SWEEPS, allow_empty=True)
  _check_names("objectives", s.objectives, TRAIN_OBJECTIVES,
               allow_empty="train" not in s.workloads)
  _check_names("sweep_objective", [s.sweep_objective], TRAIN_OBJECTIVES)
  _check_names("loop_objective", [s.loop_objective], TRAIN_OBJECTIVES)
  _check_names("model", [s.model], models.MODEL_NAMES)
  _check_names("parallel", [s.parallel], train.PARALLEL)
  _check_int("repeats", s.repeats, 1)
  _check_int("warmup", s.warmup, 0)
  _check_int("rng_seed", s.rng_seed, 0)
  for name in ("matmul_size", "chunk_size", "attack_batch",
               "attack_chunk_size"):
    _check_int(name, getattr(s, name), 1, allow_none=True)
  for name in ("ig_batch", "pgd_batch", "train_batch",
               "train_ig_steps", "train_approx_factor", "train_pgd_steps",
               "attack_steps", "attack_restarts", "attack_ig_steps",
               "loop_steps", "loop_log_every"):
    _check_int(name, getattr(s, name), 1)
  # The first logging window holds the trainer's compile: one more at least.
  if (s.loop_steps < 2 * s.loop_log_every
      or s.loop_steps % s.loop_log_every):
    raise ValueError(
        f"--loop_steps={s.loop_steps} is not accepted with --loop_log_every="
        f"{s.loop_log_every}; accepted: a multiple of it, at least twice it "
        "(the first window, which compiles, is not timed).")
  for name in ("ig_steps", "pgd_steps", "sweep_batch_sizes",
               "sweep_ig_steps"):
    values = list(getattr(s, name))
    if not values:
      raise ValueError(f"--{name} is empty; accepted: a comma-separated list "
                       "of ints >= 1.")
    for v in values:
      if (isinstance(v, bool) or not isinstance(v, (int, np.integer))
          or v < 1):
        raise ValueError(
            f"--{name}={','.join(map(str, values))} has {v!r}, which is not "
            "accepted; accepted: a comma-separated list of ints >= 1.")
  if s.train_ig_steps % s.train_approx_factor:
    divisors = [d for d in range(1, s.train_ig_steps + 1)
                if s.train_ig_steps % d == 0]
    raise ValueError(
        f"--train_approx_factor={s.train_approx_factor} does not divide "
        f"--train_ig_steps={s.train_ig_steps}; accepted: a divisor of it "
        f"({divisors}).")
  if s.data_npz is not None and not os.path.isfile(s.data_npz):
    raise ValueError(f"--data_npz={s.data_npz!r} is not a file; accepted: a "
                     ".npz file with 'images' [N, 28, 28(, 1)] uint8 and "
                     "'labels' [N] (e.g. /work/shared/data/mnist_10k.npz).")


# --- FLOPs: XLA's cost analysis, with loops counted trip-count times. --------


def _xla_flops(compiled) -> float:
  """FLOPs of a compiled program as XLA reports them (per device)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):   # older jaxlibs: one dict per program
    cost = cost[0] if cost else {}
  if not cost:                          # no cost analysis on this backend
    return float("nan")
  # A program without floating-point work (e.g. a loop body that only splits
  # PRNG keys or counts) has no "flops" entry: zero, not unknown.
  return float(cost.get("flops", 0.0))


def _sub_jaxprs(eqn):
  return list(jax_core.jaxprs_in_params(eqn.params))


def _live_eqns(jaxpr, used_outputs=None, live=None):
  """`(eqn, used)` of the equations whose results are used, last first.

  XLA drops the others (dead-code elimination), so neither FLOP count may
  count them (e.g. the weight gradient of a custom VJP when only the input
  gradient is needed). `live`, if given, is filled with the variables the
  used outputs need.
  """
  if used_outputs is None:
    used_outputs = [True] * len(jaxpr.outvars)
  live = set() if live is None else live
  live.update(v for v, used in zip(jaxpr.outvars, used_outputs)
              if used and isinstance(v, jax_core.Var))
  for eqn in reversed(jaxpr.eqns):
    used = [v in live for v in eqn.outvars]
    if not any(used) and not eqn.effects:
      continue
    live.update(v for v, needed in zip(eqn.invars, _needed_inputs(eqn, used))
                if needed and isinstance(v, jax_core.Var))
    yield eqn, used


def _needed_inputs(eqn, used) -> list[bool]:
  """Which inputs of a live equation its used outputs need.

  All of them, except for a `jit` call, whose body is walked: a call that
  returns a used constant beside an unused result (a `pad` and its padding
  value) does not need the unused result's inputs, which XLA drops.
  """
  if eqn.primitive.name == "jit" and not eqn.effects:
    body, live = eqn.params["jaxpr"].jaxpr, set()
    for _ in _live_eqns(body, used, live):
      pass
    return [v in live for v in body.invars]
  return [True] * len(eqn.invars)


def _sub_jaxprs_used(eqn, used):
  """Sub-jaxprs of a call-like equation with the outputs that are used."""
  return [(sub, used if len(sub.outvars) == len(used) else None)
          for sub in _sub_jaxprs(eqn)]


def _loop_correction(jaxpr, used_outputs, cache, notes, mesh=None) -> float:
  """FLOPs that XLA's count of `jaxpr` misses because it counts loops once.

  A scan of length L whose body XLA's count has c times (c = 1, or with
  `unroll` the copies in the loop and the remainder) adds
  `L * true(body) - c * once(body)`, where once() is XLA's cost analysis of
  the body compiled on its own and true() adds the body's own loops. `mesh`:
  that of the `shard_map` the jaxpr is in, whose axis names a body may use.
  """
  extra = 0.0
  for eqn, used in _live_eqns(jaxpr, used_outputs):
    name = eqn.primitive.name
    if name == "scan":
      body, length = eqn.params["jaxpr"], eqn.params["length"]
      unroll = eqn.params.get("unroll", 1)
      unroll = length if unroll is True else max(1, int(unroll))
      # JAX emits `unroll` copies in the loop and the remainder inline.
      copies = length if unroll >= length else unroll + length % unroll
      once, true = _body_flops(body, cache, notes, mesh)
      extra += length * true - copies * once
    elif name == "while":
      notes.add("a while loop of unknown trip count counted once")
      extra += _loop_correction(eqn.params["body_jaxpr"].jaxpr, None, cache,
                                notes, mesh)
    elif name == "cond":
      extra += max(_loop_correction(b.jaxpr, used, cache, notes, mesh)
                   for b in eqn.params["branches"])
    else:
      inner_mesh = eqn.params["mesh"] if name == "shard_map" else mesh
      for sub, sub_used in _sub_jaxprs_used(eqn, used):
        extra += _loop_correction(sub, sub_used, cache, notes, inner_mesh)
  return extra


def _body_flops(body, cache, notes, mesh=None) -> tuple[float, float]:
  """(XLA's count of a loop body compiled alone, its count with its loops).

  A body from inside a `shard_map` (its collectives name the mesh's axes) is
  compiled inside a `shard_map` over that mesh, with the same device
  variance: its inputs enter replicated and are cast to vary along the axes
  they varied along in the program, and its varying outputs leave stacked
  along those axes (a scalar as `[1]`), which changes no FLOP.
  """
  if id(body) not in cache:
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in body.in_avals]
    body_fn = fn = jax_core.jaxpr_as_fun(body)
    if mesh is not None:
      vma = lambda a: tuple(sorted(vma_lib.varying_axes_of_aval(a)))
      in_axes = [vma(a) for a in body.in_avals]
      out_axes = [vma(a) for a in body.out_avals]

      def varying_body(*args):
        outs = body_fn(*(vma_lib.cast_to_varying(x, ax)
                         for x, ax in zip(args, in_axes)))
        return [o[None] if ax and not o.ndim else o
                for o, ax in zip(outs, out_axes)]

      fn = jax.shard_map(varying_body, mesh=mesh, in_specs=P(),
                         out_specs=[P(ax) if ax else P() for ax in out_axes])
    # Compiled only for XLA's cost analysis (of the optimised HLO): LLVM's
    # optimisation of the code would change nothing but the time it takes.
    compiled = runtime.compile_for_one_run(jax.jit(fn).lower(*avals))
    once = _xla_flops(compiled)
    cache[id(body)] = (body, once, once + _loop_correction(
        body.jaxpr, None, cache, notes, mesh))
  return cache[id(body)][1:]


def _has_loops(jaxpr, used_outputs=None) -> bool:
  for eqn, used in _live_eqns(jaxpr, used_outputs):
    if eqn.primitive.name in ("scan", "while"):
      return True
    if any(_has_loops(sub, sub_used)
           for sub, sub_used in _sub_jaxprs_used(eqn, used)):
      return True
  return False


def _in_bounds_taps(in_size, kernel, out_size, *, stride=1, pad_lo=0,
                    lhs_dilation=1, rhs_dilation=1) -> int:
  """(output position, kernel tap) pairs of one conv dimension that read the
  input rather than padding (what XLA's cost analysis counts)."""
  out = np.arange(out_size)[:, None]
  tap = np.arange(kernel)[None, :]
  pos = out * stride + tap * rhs_dilation - pad_lo
  valid = ((pos >= 0) & (pos < (in_size - 1) * lhs_dilation + 1)
           & (pos % lhs_dilation == 0))
  return int(valid.sum())


def _conv_flops(eqn) -> float:
  p = eqn.params
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  taps = 1
  for d in range(len(lhs_spec) - 2):
    taps *= _in_bounds_taps(
        lhs[lhs_spec[2 + d]], rhs[rhs_spec[2 + d]], out[out_spec[2 + d]],
        stride=p["window_strides"][d], pad_lo=p["padding"][d][0],
        lhs_dilation=p["lhs_dilation"][d] if p["lhs_dilation"] else 1,
        rhs_dilation=p["rhs_dilation"][d] if p["rhs_dilation"] else 1)
  # Every output element sums over the kernel's input features (per group)
  # and the in-bounds taps.
  return 2.0 * out[out_spec[0]] * out[out_spec[1]] * rhs[rhs_spec[1]] * taps


def matmul_flops_from_jaxpr(jaxpr, used_outputs=None) -> float:
  """Convolution and matmul FLOPs (2 per multiply-add) of a jaxpr, per device.

  Counts what XLA runs: equations whose results are unused are dropped (as
  XLA's dead-code elimination does, e.g. the weight gradient of a custom
  VJP when only the input gradient is needed), convolution taps that fall on
  padding are not counted, loops count trip-count times (a while loop of
  unknown trip count once), and a matmul that contracts one element (a
  dense layer's kernel gradient at batch 1, IG's weighted sum over a chunk
  of one point) is a product: 1 FLOP per output, as XLA:CPU counts it.
  Elementwise work is left out, so this is a lower bound of the true count
  that does not depend on XLA's cost analysis.

  Args:
    jaxpr: a `Jaxpr` (e.g. `jax.make_jaxpr(fn)(*args).jaxpr`).
    used_outputs: which outputs are used (None: all).

  Returns:
    The FLOPs of the live `dot_general` and `conv_general_dilated`
    equations.
  """
  return sum(_eqn_matmul_flops(eqn, used)
             for eqn, used in _live_eqns(jaxpr, used_outputs))


def _eqn_matmul_flops(eqn, used) -> float:
  name = eqn.primitive.name
  if name == "dot_general":
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    size = math.prod(lhs[d] for d in contract)
    return (1.0 if size == 1 else 2.0 * size) * math.prod(
        eqn.outvars[0].aval.shape)
  if name == "conv_general_dilated":
    return _conv_flops(eqn)
  if name == "scan":   # the carry feeds back: every body output counts
    return eqn.params["length"] * matmul_flops_from_jaxpr(
        eqn.params["jaxpr"].jaxpr)
  if name == "while":
    return matmul_flops_from_jaxpr(eqn.params["body_jaxpr"].jaxpr)
  if name == "cond":
    return max(matmul_flops_from_jaxpr(b.jaxpr, used)
               for b in eqn.params["branches"])
  # jit, custom_jvp_call, custom_vjp_call, shard_map, ...
  return sum(matmul_flops_from_jaxpr(sub, sub_used)
             for sub, sub_used in _sub_jaxprs_used(eqn, used))


def count_flops(fn, args, compiled, *, num_devices=1,
                jaxpr=None) -> dict[str, Any]:
  """FLOPs of `fn(*args)` (all devices) with the method used to count them.

  Args:
    fn: the traceable function that `compiled` was compiled from.
    args: its arguments.
    compiled: `fn.lower(*args).compile()`.
    num_devices: devices the program runs on (its cost analysis and jaxpr
      count one device; the totals multiply by this).
    jaxpr: `fn`'s jaxpr if already traced (None: traced here).

  Returns:
    `flops` (the best count), `flops_method`, `flops_xla_raw` (XLA's count
    with every loop body once), `flops_matmul_jaxpr`, `flops_analysis_s`.
  """
  t0 = time.perf_counter()
  if jaxpr is None:
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  raw = _xla_flops(compiled)
  notes = set()
  if _has_loops(jaxpr):
    flops = raw + _loop_correction(jaxpr, None, {}, notes)
    method = "xla_cost_analysis+loop_bodies_x_trip_count"
  else:
    flops, method = raw, "xla_cost_analysis"
  if num_devices > 1:
    method += f"; per_device_x_{num_devices}"
  if notes:
    method += "; inexact: " + "; ".join(sorted(notes))
  matmul = matmul_flops_from_jaxpr(jaxpr)
  # XLA's count includes the convolutions and matmuls: below them, XLA ran
  # the loops otherwise than assumed (e.g. unrolled or split them).
  if flops < 0.95 * matmul:
    logging.warning("FLOPs by XLA (%.4g, %s) are below the jaxpr's matmul "
                    "FLOPs (%.4g); check flops_method.", flops, method,
                    matmul)
  return dict(flops=flops * num_devices, flops_method=method,
              flops_xla_raw=raw * num_devices,
              flops_matmul_jaxpr=matmul * num_devices,
              flops_analysis_s=time.perf_counter() - t0)


def analytic_flops(model_name: str, image_shape) -> Optional[dict[str, float]]:
  """Per-example conv + FC FLOPs of an `MnistCNN`-family model, by hand.

  `forward = 2 * (sum_conv H W C_in C_out k^2 + sum_fc in * out)` (for
  mnist_cnn on 28x28x1: 2 * (28*28*32*25 + 14*14*64*32*25 + 3136*1024 +
  1024*10) = 27.8 MFLOP); `forward_in_bounds` counts only the conv taps that
  fall inside the image (SAME padding), as XLA does. The input gradient that
  IG and PGD need costs one more forward pass (every layer's input gradient,
  the first conv's included; no weight gradients).

  Args:
    model_name: a name in `models.MODEL_NAMES`.
    image_shape: `(H, W, C)`.

  Returns:
    `{"forward", "forward_in_bounds", "forward_and_input_grad",
    "few_channel_out_of_bounds"}` FLOPs per example
    (`forward_and_input_grad` is `2 * forward`; the last counts the taps
    outside the image of the convs whose input gradient is a matmul over
    all taps, `models.input_grad_is_matmul`), or None for
    models outside the `MnistCNN` family.
  """
  model = models.get_model(model_name, num_classes=NUM_CLASSES)
  if not isinstance(model, models.MnistCNN):
    return None
  h, w, c = image_shape
  k = model.kernel_size
  naive = in_bounds = few_out_of_bounds = 0.0
  for features in model.conv_features:
    layer = 2.0 * h * w * c * features * k * k
    layer_in_bounds = 2.0 * c * features * (
        _in_bounds_taps(h, k, h, pad_lo=(k - 1) // 2)
        * _in_bounds_taps(w, k, w, pad_lo=(k - 1) // 2))
    naive += layer
    in_bounds += layer_in_bounds
    if models.input_grad_is_matmul(c, features):
      few_out_of_bounds += layer - layer_in_bounds
    h, w, c = -(-h // 2), -(-w // 2), features
  fc = 2.0 * (h * w * c * model.dense_features
              + model.dense_features * NUM_CLASSES)
  return {"forward": naive + fc, "forward_in_bounds": in_bounds + fc,
          "forward_and_input_grad": 2.0 * (naive + fc),
          "few_channel_out_of_bounds": few_out_of_bounds}


# --- Timing one compiled program. --------------------------------------------


def _memory(compiled) -> dict[str, Any]:
  stats = compiled.memory_analysis()
  if isinstance(stats, (list, tuple)):
    stats = stats[0] if stats else None
  if stats is None:
    return {"memory": None, "peak_memory_bytes": None,
            "peak_memory_mib": None}
  fields = {name: int(getattr(stats, name)) for name in dir(stats)
            if name.endswith("_in_bytes") and not name.startswith("_")}
  peak = (fields.get("argument_size_in_bytes", 0)
          + fields.get("output_size_in_bytes", 0)
          + fields.get("temp_size_in_bytes", 0)
          - fields.get("alias_size_in_bytes", 0))
  return {"memory": fields, "peak_memory_bytes": peak,
          "peak_memory_mib": peak / _MIB}


def _run_timed(call, warmup, repeats) -> list[float]:
  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
  return times


def benchmark_fn(name: str, fn, args, *, settings: Settings, peak: float,
                 num_examples: Optional[int] = None, num_devices: int = 1,
                 per_example_seconds: bool = False, cache=None,
                 cache_key=None, **extra) -> dict[str, Any]:
  """Compiles, analyses and times one program; returns its record.

  Args:
    name: the record's name (table row).
    fn: a jitted (or pmapped) function with `.lower`.
    args: its arguments (device arrays).
    settings: `warmup` and `repeats` are read.
    peak: the measured matmul FLOP/s of one device (NaN: unknown).
    num_examples: examples per call (None: no throughput).
    num_devices: devices the program runs on.
    per_example_seconds: also report `seconds_per_example`.
    cache: a dict of compiled programs, or None; a program compiled before
      under `cache_key` is timed again, not recompiled (its record keeps the
      first compile time and says `compiled_earlier`).
    cache_key: what identifies the program (hashable).
    **extra: more fields of the record (workload, sweep, sizes).

  Returns:
    The record (see the module docstring).
  """
  entry, reused = _compile(fn, args, num_devices=num_devices, cache=cache,
                           cache_key=cache_key)
  compiled = entry["compiled"]
  times = _run_timed(lambda: compiled(*args), settings.warmup,
                     settings.repeats)
  record = dict(name=name, **extra)
  record.update(_summary(times, lower_s=entry["lower_s"],
                         compile_s=entry["compile_s"]))
  record["compiled_earlier"] = reused
  record.update(entry["analysis"])
  _add_rates(record, peak=peak, num_examples=num_examples,
             num_devices=num_devices, per_example_seconds=per_example_seconds)
  logging.info("%s: median %.4g s, compile %.3g s", name, record["median_s"],
               record["compile_s"])
  return record


def _compile(fn, args, *, num_devices=1, cache=None, cache_key=None,
             count=True):
  """`({"compiled", "lower_s", "compile_s", "analysis"}, reused)`.

  `analysis` holds the FLOP counts (if `count`) and the memory analysis; an
  entry of `cache` under `cache_key` is returned as it is.
  """
  if cache is not None and cache_key in cache:
    return cache[cache_key], True
  t0 = time.perf_counter()
  if hasattr(fn, "trace"):   # jit: trace once for the lowering and the FLOPs
    traced = fn.trace(*args)
    jaxpr, lowered = traced.jaxpr.jaxpr, traced.lower()
  else:                      # pmap
    jaxpr, lowered = None, fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  analysis = _memory(compiled)
  if count:
    analysis.update(count_flops(fn, args, compiled, num_devices=num_devices,
                                jaxpr=jaxpr))
  entry = dict(compiled=compiled, lower_s=t1 - t0, compile_s=t2 - t1,
               analysis=analysis)
  if cache is not None:
    cache[cache_key] = entry
  return entry, False


def _summary(times, **fields):
  return dict(fields, repeats=len(times), times_s=times,
              median_s=statistics.median(times), min_s=min(times),
              max_s=max(times))


def _add_rates(record, *, peak, num_examples, num_devices=1,
               per_example_seconds=False):
  median = record["median_s"]
  record["num_devices"] = num_devices
  record["num_examples"] = num_examples
  record["examples_per_s"] = (num_examples / median if num_examples
                              else None)
  if per_example_seconds:
    record["seconds_per_example"] = median / num_examples
  flops = record.get("flops")
  record["flops_per_s"] = (flops / median if flops is not None
                           and math.isfinite(flops) else None)
  record["fraction_of_peak"] = (
      record["flops_per_s"] / (peak * num_devices)
      if record["flops_per_s"] is not None and math.isfinite(peak) and peak > 0
      else None)


# --- The workloads. ----------------------------------------------------------


def _platform_default(value, cpu, accelerator):
  if value is not None:
    return value
  return cpu if jax.default_backend() == "cpu" else accelerator


def load_images(settings: Settings) -> tuple[np.ndarray, np.ndarray]:
  """Real digits: the embedded MNIST sample's train split, or --data_npz.

  Args:
    settings: `data_npz` is read.

  Returns:
    `(images float32 [N, 28, 28, 1] in [0, 1], labels int32 [N])`.
  """
  name, pixel_max = _data_source(settings)
  return data_lib.load_dataset(name, "train", pixel_max=pixel_max)


def _data_source(settings: Settings) -> tuple[str, Optional[float]]:
  """The `rar_jax.data` name and `pixel_max` of the benchmark's digits."""
  if settings.data_npz is None:
    return "embedded_mnist", None   # the source's default: [0, 1]
  return "npz:" + settings.data_npz, 1.0


def _batch(images, labels, size):
  """The first `size` examples (cycled when the data set is smaller)."""
  idx = np.arange(size) % len(labels)
  return jnp.asarray(images[idx]), jnp.asarray(labels[idx])


def _chunk_size_used(chunk_size, batch, steps):
  """The IG chunk size `chunk_size` ("auto", an int or None) stands for."""
  return auto_chunk_size(batch, steps) if chunk_size == "auto" else chunk_size


def _attack_sizes(s: Settings, batch: int) -> dict[str, Any]:
  """An attack record's sizes, with how it chunks its IGs.

  `chunk_size_used` is the IG points the attack takes at once for `batch`
  examples times `attack_restarts` rows (None: all), and `unroll_chunks`
  whether it traces those chunks one after another (True) or scans them:
  `attacks.attack_chunking` unless --attack_chunk_size is set (a scan).
  """
  if s.attack_chunk_size:
    chunk, unroll = s.attack_chunk_size, False
  else:
    chunk, unroll = attack_chunking(batch * s.attack_restarts,
                                    s.attack_ig_steps)
  return dict(workload="attack", batch=batch, attack_steps=s.attack_steps,
              attack_restarts=s.attack_restarts,
              attack_ig_steps=s.attack_ig_steps,
              chunk_size=s.attack_chunk_size or "auto",
              chunk_size_used=chunk, unroll_chunks=unroll)


def _reported_hyper(hyper):
  """A train record's `hyper`: the objective's hyper-parameters that are set."""
  return {k: v for k, v in hyper.items() if v is not None}


def _objective_config(name: str, settings: Settings):
  """The paper's MNIST preset of an objective, with the benchmark's sizes."""
  if name in paper.METHODS:
    config = paper.get_config(f"mnist,{name}")
  else:   # TRADES has no preset: the MNIST Madry settings, beta = lam = 1.
    config = paper.get_config("mnist,madry")
    config.objective.name = name
  config.objective.num_steps = settings.train_pgd_steps
  config.objective.m = settings.train_ig_steps
  config.objective.approx_factor = settings.train_approx_factor
  return config


class _Workloads:
  """The model, parameters, data and paper settings shared by the workloads.

  Each method benchmarks one program and returns its record(s); programs
  compiled once are kept in `cache` for the sweep points that repeat them.
  """

  def __init__(self, settings: Settings, peak: float):
    self.s = settings
    self.peak = peak
    self.cache = {}   # programs compiled once, timed by every record of them
    self.images, self.labels = load_images(settings)
    self.image_shape = self.images.shape[1:]
    init_fn, self.apply_fn, self.surrogate_fn = models.make_apply_fns(
        settings.model, num_classes=NUM_CLASSES)
    self.key = jax.random.key(settings.rng_seed)
    self.params = runtime.run_once(init_fn, self.key,
                                   jnp.asarray(self.images[:1]))
    self.analytic = analytic_flops(settings.model, self.image_shape)
    madry = paper.get_config("mnist,madry")
    self.pgd_kwargs = dict(
        epsilon=madry.objective.epsilon, step_size=madry.objective.step_size,
        clip_min=madry.objective.clip_min, clip_max=madry.objective.clip_max)
    a = madry.attack
    self.attack_kwargs = dict(
        epsilon=madry.objective.epsilon, step_size=a.step_size, k_top=a.k_top,
        eval_k=a.eval_k, clip_min=madry.objective.clip_min,
        clip_max=madry.objective.clip_max)

  def _analytic(self, record, points):
    if self.analytic is not None:
      record["flops_analytic"] = points * self.analytic[
          "forward_and_input_grad"]
      record["flops_over_analytic"] = record["flops"] / record[
          "flops_analytic"]
    return record

  def ig(self, batch, steps, chunk_size, *, name, **extra):
    """IG of the label logit, `steps` points, black baseline."""
    apply_fn = self.apply_fn

    def ig_fn(params, x, y):
      def logit(z):
        return jnp.take_along_axis(apply_fn(params, z), y[:, None], -1)[:, 0]
      return integrated_gradients(logit, x, num_steps=steps,
                                  chunk_size=chunk_size)

    x, y = _batch(self.images, self.labels, batch)
    record = benchmark_fn(
        name, jax.jit(ig_fn), (self.params, x, y), settings=self.s,
        peak=self.peak, cache=self.cache, cache_key=("ig", batch, steps,
                                                     chunk_size),
        num_examples=batch, workload="ig", batch=batch,
        ig_steps=steps, chunk_size=chunk_size,
        chunk_size_used=_chunk_size_used(chunk_size, batch, steps), **extra)
    return self._analytic(record, batch * steps)

  def pgd(self, batch, steps):
    """L-inf PGD on the cross-entropy, random start."""
    apply_fn, kwargs = self.apply_fn, self.pgd_kwargs

    def pgd_fn(params, x, y, key):
      ce = lambda z: objectives.cross_entropy(apply_fn(params, z), y)
      return pgd(ce, x, key=key, num_steps=steps, **kwargs)

    x, y = _batch(self.images, self.labels, batch)
    record = benchmark_fn(
        f"pgd B={batch} steps={steps}", jax.jit(pgd_fn),
        (self.params, x, y, self.key), settings=self.s, peak=self.peak,
        cache=self.cache, cache_key=("pgd", batch, steps),
        num_examples=batch, workload="pgd", batch=batch, pgd_steps=steps,
        **self.pgd_kwargs)
    return self._analytic(record, batch * steps)

  def _train_program(self, objective, per_device_batch, num_devices):
    """`(step_fn, args, hyper)`: a train step and its first arguments."""
    config = _objective_config(objective, self.s)
    hyper = train.objective_hyper(config)
    tx = train.create_optimizer(config.optimizer)
    # rar_jax.train's data parallelism, as the trainer runs it.
    parallel = train._Parallel(  # pylint: disable=protected-access
        self.s.parallel, num_devices)
    step_fn = parallel.compile(functools.partial(
        train.train_step, apply_fn=self.apply_fn, objective=objective,
        hyper=hyper, tx=tx), num_replicated=1)
    batch = per_device_batch * num_devices
    x, y = _batch(self.images, self.labels, batch)
    keys = jax.random.key_data(jax.random.split(self.key, batch))
    state = {"params": self.params, "opt_state": tx.init(self.params),
             "step": np.int32(0)}
    args = (parallel.replicate(jax.device_get(state)),
            *parallel.shard([np.asarray(x), np.asarray(y),
                             np.asarray(keys)]))
    return step_fn, args, hyper

  def train_step(self, objective, per_device_batch, num_devices, *, name,
                 **extra):
    """One `rar_jax.train.train_step` on `num_devices` devices."""
    step_fn, args, hyper = self._train_program(objective, per_device_batch,
                                               num_devices)
    batch = per_device_batch * num_devices
    record = benchmark_fn(
        name, step_fn, args, settings=self.s, peak=self.peak,
        cache=self.cache,
        cache_key=("train", objective, per_device_batch, num_devices),
        num_examples=batch, num_devices=num_devices, workload="train",
        objective=objective, batch=batch, per_device_batch=per_device_batch,
        parallel=self.s.parallel,
        hyper=_reported_hyper(hyper), **extra)
    record["steps_per_s"] = 1.0 / record["median_s"]
    return record

  def loop(self, objective, batch):
    """`rar_jax.train.train_and_evaluate`'s seconds per step, and its step's.

    The trainer runs `loop_steps` steps on one device, logging every
    `loop_log_every`: each logging window but the first (which compiles) is
    one timing (`times_s`, seconds per step). Its final evaluation is kept
    small (`batch` examples, 1 PGD step) and is not timed. The step alone is
    the train workload's program (the same `rar_jax.train.train_step`, not
    donating its state) called `loop_log_every` times back to back, each
    call's state fed to the next, blocking once at the end (`repeats` times,
    half before the trainer and half after it, at least once on each side):
    the device's throughput without the trainer's host work.
    `loop_efficiency` is alone / loop seconds per step.
    """
    s = self.s
    step_fn, args, hyper = self._train_program(objective, batch, 1)
    entry, reused = _compile(step_fn, args, cache=self.cache,
                             cache_key=("train", objective, batch, 1))
    compiled, state, rest = entry["compiled"], args[0], args[1:]

    def steps_alone():
      st = state
      for _ in range(s.loop_log_every):
        st, sums = compiled(st, *rest)
      return st, sums

    # Half of the repeats before the trainer and half after it, so that a
    # shared machine's drift affects both sides alike.
    before, after = _split_repeats(s.repeats)
    alone = _run_timed(steps_alone, s.warmup, before)

    config = _objective_config(objective, s)
    config.seed = s.rng_seed
    config.model.name = s.model
    config.model.activation = None
    config.dataset.name, config.dataset.pixel_max = _data_source(s)
    config.dataset.data_dir = None
    config.dataset.train_split, config.dataset.test_split = "train", "test"
    config.dataset.num_classes = NUM_CLASSES
    config.parallel, config.num_devices = s.parallel, 1
    config.batch_size, config.num_train_steps = batch, s.loop_steps
    config.log_every_steps = s.loop_log_every
    config.checkpoint_every_steps = config.eval_every_steps = 0
    config.eval.batch_size = config.eval.num_examples = batch
    config.eval.pgd_num_examples, config.eval.pgd_num_steps = batch, 1
    with tempfile.TemporaryDirectory() as workdir:
      t0 = time.perf_counter()
      final = train.train_and_evaluate(config, workdir)
      wall = time.perf_counter() - t0
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rates = [r["steps_per_sec"] for r in map(json.loads, f)
                 if "steps_per_sec" in r]
    alone = [t / s.loop_log_every for t in alone + _run_timed(
        steps_alone, 0, after)]
    record = dict(name=f"loop {objective} B={batch}", workload="loop",
                  objective=objective, batch=batch, parallel=s.parallel,
                  loop_steps=s.loop_steps, loop_log_every=s.loop_log_every,
                  steps_run=final["step"], compiled_earlier=reused,
                  hyper=_reported_hyper(hyper))
    record.update(_summary([1.0 / r for r in rates[1:]],
                           lower_s=entry["lower_s"],
                           compile_s=entry["compile_s"]))
    record["first_window_s"] = s.loop_log_every / rates[0]
    record["trainer_wall_s"] = wall
    record.update(entry["analysis"])
    _add_rates(record, peak=self.peak, num_examples=batch)
    record["steps_per_s"] = 1.0 / record["median_s"]
    record["step_alone_times_s"] = alone
    record["step_alone_s"] = statistics.median(alone)
    record["loop_efficiency"] = record["step_alone_s"] / record["median_s"]
    record["loop_overhead_ms_per_step"] = 1e3 * (
        record["median_s"] - record["step_alone_s"])
    logging.info("%s: %.4g s/step in the loop, %.4g alone", record["name"],
                 record["median_s"], record["step_alone_s"])
    return record

  def kernel_plan(self, batches):
    """Each conv and dense layer's kernels at each of `batches`, compiled.

    Returns entries for `time_kernels` (which adds timings to them) and
    `kernel_records`.
    """
    model = models.get_model(self.s.model, num_classes=NUM_CLASSES)
    plan = []
    for batch in batches:
      layers = linear_layers(model, (batch,) + tuple(self.image_shape))
      for index, (path, layer, x_struct) in enumerate(layers):
        kx, kg, kp = jax.random.split(jax.random.fold_in(self.key, index), 3)
        x = jax.random.normal(kx, x_struct.shape, x_struct.dtype)
        params = layer.init(kp, x)["params"]
        y = jax.eval_shape(layer.apply, {"params": params}, x)
        g = jax.random.normal(kg, y.shape, y.dtype)
        for op in KERNEL_OPS:
          fn, args = _kernel_program(layer, op), (params, x, g)
          entry, _ = _compile(fn, args, cache=self.cache,
                              cache_key=("kernel", path, op, batch))
          plan.append(dict(
              entry=entry, args=args, times=[], record=dict(
                  name=f"kernel {path} {op} B={batch}", workload="kernels",
                  layer=path, layer_index=index, op=op, batch=batch,
                  calls_per_timing=KERNEL_CALLS, input_shape=list(x.shape),
                  kernel_shape=list(params["kernel"].shape),
                  compiled_earlier=False)))
    return plan

  def time_kernels(self, plan, *, warmup, repeats):
    """Times every kernel of `plan` `repeats` times (KERNEL_CALLS calls each)."""
    for item in plan:
      compiled, args = item["entry"]["compiled"], item["args"]

      def calls(compiled=compiled, args=args):
        return [compiled(*args) for _ in range(KERNEL_CALLS)]

      item["times"] += [t / KERNEL_CALLS
                        for t in _run_timed(calls, warmup, repeats)]

  def kernel_records(self, plan):
    """The kernels workload's records, from `plan`'s timings."""
    records = []
    for item in plan:
      entry, record = item["entry"], dict(item["record"])
      record.update(_summary(item["times"], lower_s=entry["lower_s"],
                             compile_s=entry["compile_s"]))
      record.update(entry["analysis"])
      _add_rates(record, peak=self.peak, num_examples=record["batch"])
      records.append(record)
    return records

  def _attack_fn(self, batch):
    s, kwargs = self.s, self.attack_kwargs
    apply_fn, surrogate_fn = self.apply_fn, self.surrogate_fn

    def attack_fn(params, x, y, key):
      return attribution_attack(
          apply_fn, params, x, y, surrogate_apply_fn=surrogate_fn, key=key,
          num_steps=s.attack_steps, num_restarts=s.attack_restarts,
          num_ig_steps=s.attack_ig_steps,
          chunk_size=s.attack_chunk_size or "auto",
          **kwargs)

    x, y = _batch(self.images, self.labels, batch)
    return jax.jit(attack_fn), (self.params, x, y, self.key)

  def attack(self, batch):
    """The top-k attribution attack on a batch; seconds per example."""
    s = self.s
    sizes = dict(_attack_sizes(s, batch), **self.attack_kwargs)
    fn, args = self._attack_fn(batch)
    records = [benchmark_fn(
        f"attack B={batch}", fn, args, settings=s, peak=self.peak,
        cache=self.cache, cache_key=("attack", batch), num_examples=batch,
        per_example_seconds=True, **sizes)]
    if s.attack_single:
      records.append(self._attack_single(batch, records[0], sizes))
    return records

  def _attack_single(self, batch, batched, sizes):
    """The same examples one at a time through one compiled batch-1 attack."""
    fn, (params, _, _, key) = self._attack_fn(1)
    x, y = _batch(self.images, self.labels, batch)
    # With --attack_batch=1 this is the batched run's program.
    entry, reused = _compile(fn, (params, x[:1], y[:1], key),
                             cache=self.cache, cache_key=("attack", 1),
                             count=False)
    compiled = entry["compiled"]
    examples = [(x[i:i + 1], y[i:i + 1]) for i in range(batch)]

    def all_examples():
      return [compiled(params, xi, yi, key) for xi, yi in examples]

    times = _run_timed(all_examples, self.s.warmup, self.s.repeats)
    record = dict(name=f"attack 1 at a time x{batch}", one_at_a_time=True,
                  compiled_earlier=reused, **sizes)
    # Its IGs are chunked for the rows of one example.
    one = _attack_sizes(self.s, 1)
    record.update({k: one[k] for k in ("chunk_size_used", "unroll_chunks")})
    record.update(_summary(times, lower_s=entry["lower_s"],
                           compile_s=entry["compile_s"]))
    # The same arithmetic as the batched program, one example at a time: its
    # count is taken (a second loop analysis would cost another compile).
    record.update({k: batched[k] for k in (
        "flops", "flops_xla_raw", "flops_matmul_jaxpr")})
    record["flops_method"] = batched["flops_method"] + "; of the batched run"
    record["flops_analysis_s"] = 0.0
    record.update(_memory(compiled))
    _add_rates(record, peak=self.peak, num_examples=batch,
               per_example_seconds=True)
    record["speedup_batched_vs_one_at_a_time"] = (
        record["seconds_per_example"] / batched["seconds_per_example"])
    return record


# --- The kernels alone: a floor under the ig, pgd, train, attack records. ---

# The last two are what differentiating an input gradient runs: the input
# gradient's own transpose (in its output gradient) and its kernel gradient.
KERNEL_OPS = ("forward", "input_grad", "kernel_grad", "input_grad_transpose",
              "input_grad_kernel_grad")
# The sums a floor's terms weigh: each op's, and the first layer's input
# gradient and its transpose alone.
_FLOOR_KEYS = KERNEL_OPS + ("first_input_grad", "first_input_grad_transpose")
# Calls of one kernel back to back per timing (one call is a few ms on CPU).
KERNEL_CALLS = 10


def linear_layers(model: nn.Module, input_shape) -> list[tuple[str, Any, Any]]:
  """The `nn.Conv` and `nn.Dense` calls of `model` on `input_shape`, in order.

  Args:
    model: a Flax module (unbound).
    input_shape: `[N, H, W, C]`, the model's input (N is the batch the
      layers are timed at).

  Returns:
    `[(path, layer, x)]`: the layer's scope path ("conv1",
    "unit_1_0/conv2"), the module without its bias (unbound: `layer.init`,
    `layer.apply`), and its input as a `jax.ShapeDtypeStruct`.

  Example:
    >>> from rar_jax import models
    >>> layers = linear_layers(models.get_model("tiny_cnn", num_classes=10),
    ...                        (2, 28, 28, 1))
    >>> [(path, x.shape) for path, _, x in layers]   # doctest: +NORMALIZE_WHITESPACE
    [('conv1', (2, 28, 28, 1)), ('conv2', (2, 14, 14, 2)), ('fc1', (2, 196)),
     ('fc2', (2, 8))]
  """
  calls = []

  def record(next_fun, args, kwargs, context):
    m = context.module
    if (context.method_name == "__call__"
        and isinstance(m, (nn.Conv, nn.Dense))):
      calls.append(("/".join(m.scope.path),
                    m.clone(parent=None, name=None, use_bias=False),
                    jax.ShapeDtypeStruct(args[0].shape, args[0].dtype)))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                   jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  return calls


def _kernel_program(layer, op):
  """`(params, x, g) -> ...`: one layer's `op` (of `KERNEL_OPS`), jitted."""
  apply = lambda p, x: layer.apply({"params": p}, x)
  input_grad = lambda p, x, g: jax.vjp(lambda z: apply(p, z), x)[1](g)[0]
  if op == "forward":
    return jax.jit(lambda p, x, g: apply(p, x))
  if op == "input_grad":
    return jax.jit(input_grad)
  if op == "kernel_grad":
    return jax.jit(lambda p, x, g: jax.vjp(lambda q: apply(q, x), p)[1](g))
  # Differentiating the input gradient, with x (its shape) as the cotangent.
  if op == "input_grad_transpose":
    return jax.jit(lambda p, x, g: jax.vjp(
        lambda h: input_grad(p, x, h), g)[1](x))
  if op == "input_grad_kernel_grad":
    return jax.jit(lambda p, x, g: jax.vjp(
        lambda q: input_grad(q, x, g), p)[1](x))
  raise ValueError(f"Unknown kernel op {op!r}; accepted: {KERNEL_OPS}.")


def kernel_floor_terms(record: dict[str, Any],
                       platform: Optional[str] = None
                       ) -> Optional[list[dict[str, Any]]]:
  """The layer kernels an ig, pgd, train or attack record runs, by hand.

  With F, B and K the sums over the model's conv and dense layers of the
  forward, input-gradient and kernel-gradient times at one batch, B1 the
  first layer's input gradient (which a gradient in the parameters does not
  need), and T and KB the sums of the input gradients' transposes and
  kernel gradients (what differentiating an input gradient runs): IG and PGD
  run F + B per point or step; a parameter gradient of a loss F + B - B1 +
  K; the gradient of an input gradient, in the input, F + 2 B + T, and in
  the parameters F + 2 B - B1 + T + KB + K. Chunked IG runs each sum at the
  chunk's images, once per chunk (a last, smaller chunk at its own batch),
  except the first layer's transpose T1 when IG is differentiated: its
  input is the cotangent of the input gradients, the same at every point
  (the right Riemann sum of the objectives and the attack weighs the
  points equally), so it is counted once per chunk size. XLA:CPU computed
  it once across equal unrolled chunks, once more for a smaller last
  chunk, and once per gradient outside a scan over equal chunks when that
  gradient is in no loop (`BUILD.md`, Performance, item 11); in the
  attack's step loop, a scan over chunks (`unroll_chunks` False) computes
  it in every chunk, and so does the count.
  Madry: PGD, the clean forward (reported) and the adversarial loss's
  gradient. TRADES: PGD on the KL, and the clean and adversarial losses'
  gradients. IG-NORM: PGD on `||IG_{m/c}||_1` (its chunks as `objectives`
  takes them), the gradient of `||IG_m||_1` and of the clean loss, and the
  adversarial forward (reported); IG-SUM-NORM adds the loss's gradient to
  every PGD step. The top-k attack: each step the gradient of the
  surrogate's IG in the input and the network's IG (all `batch` x
  restarts rows, in chunks of `chunk_size_used` points) and its forward
  (the label check); before the steps, the reference IG of the `batch`
  examples in the same chunks, and after them, their forward (the
  surrogate has the network's layers). A forward that repeats one counted
  already (the same parameters and inputs: the step's adversarial logits
  for its metrics, TRADES's adversarial cross-entropy) is counted once,
  since XLA may compute it once; so is nothing outside the layers (IG's
  weighted sum of points).

  Args:
    record: an ig, pgd, train or attack record (`workload`, `batch`,
      `ig_steps`, `chunk_size_used`, `pgd_steps`, `objective`, `hyper`,
      `num_devices`, `attack_steps`, `attack_restarts`, `attack_ig_steps`,
      `unroll_chunks`, `one_at_a_time`).
    platform: for the train steps' IG chunks; None: JAX's default backend.

  Returns:
    `[{"times", "batch", "forward", "input_grad", "first_input_grad",
    "kernel_grad", "input_grad_transpose", "first_input_grad_transpose",
    "input_grad_kernel_grad"}]` (the coefficients of F, B, B1, K, T, T1
    and KB at `batch`, summed `times` times), or None for other records,
    for steps on more than one device and for the attack one example at a
    time.

  Example:
    >>> kernel_floor_terms(dict(workload="pgd", batch=50, pgd_steps=40))
    ... # doctest: +NORMALIZE_WHITESPACE
    [{'times': 40, 'batch': 50, 'forward': 1, 'input_grad': 1,
      'first_input_grad': 0, 'kernel_grad': 0, 'input_grad_transpose': 0,
      'first_input_grad_transpose': 0, 'input_grad_kernel_grad': 0}]
  """
  def term(times, batch, f=0, b=0, b1=0, k=0, t=0, t1=0, kb=0):
    return dict(times=times, batch=batch, forward=f, input_grad=b,
                first_input_grad=b1, kernel_grad=k, input_grad_transpose=t,
                first_input_grad_transpose=t1, input_grad_kernel_grad=kb)

  def chunked(points, chunk, batch, **coefficients):
    """IG of `points` in chunks of `chunk` points (None: all at once)."""
    chunk = min(chunk or points, points)
    full, rest = divmod(points, chunk)
    return [term(full, chunk * batch, **coefficients)] + (
        [term(1, rest * batch, **coefficients)] if rest else [])

  def differentiated(points, chunk, batch, **coefficients):
    """`chunked` for the gradient of an input gradient: T1 per chunk size."""
    terms = chunked(points, chunk, batch, t=1, t1=-1, **coefficients)
    return terms + [term(1, t["batch"], t1=1) for t in terms]

  workload, batch = record.get("workload"), record.get("batch")
  if workload == "ig":
    return chunked(record["ig_steps"], record["chunk_size_used"], batch, f=1,
                   b=1)
  if workload == "pgd":
    return [term(record["pgd_steps"], batch, f=1, b=1)]
  if workload == "attack" and not record.get("one_at_a_time"):
    rows = batch * record["attack_restarts"]
    points, chunk = record["attack_ig_steps"], record["chunk_size_used"]
    surrogate_grad = (differentiated if record["unroll_chunks"] else
                      functools.partial(chunked, t=1))
    step = (surrogate_grad(points, chunk, rows, f=1, b=2)
            + chunked(points, chunk, rows, f=1, b=1) + [term(1, rows, f=1)])
    return [dict(t, times=t["times"] * record["attack_steps"])
            for t in step] + chunked(points, chunk, batch, f=1, b=1) + [
                term(1, batch, f=1)]
  if workload != "train" or record.get("num_devices", 1) != 1:
    return None
  objective, hyper = record["objective"], record["hyper"]
  loss_grad = term(1, batch, f=1, b=1, b1=-1, k=1)
  if objective == "natural":
    return [loss_grad]
  steps = hyper["num_steps"]
  if objective == "madry":
    return [term(steps, batch, f=1, b=1), term(1, batch, f=1), loss_grad]
  if objective == "trades":
    return [term(steps, batch, f=1, b=1), term(2, batch, f=1, b=1, b1=-1,
                                                k=1)]
  m = hyper["m"]
  inner = m // hyper["approx_factor"]
  terms = []
  for t in differentiated(inner, unrolled_chunk_size(batch, inner, platform),
                          batch, f=1, b=2):
    terms.append(dict(t, times=t["times"] * steps))
  if objective == "ig_sum_norm":
    terms.append(term(steps, batch, f=1, b=1))
  return terms + differentiated(m, auto_chunk_size(batch, m, platform), batch,
                                f=1, b=2, b1=-1, kb=1, k=1) + [
                                    loss_grad, term(1, batch, f=1)]


def _split_repeats(repeats: int) -> tuple[int, int]:
  """Timings before and after what a record is compared with.

  The kernels are timed around the other workloads, the loop's step alone
  around the trainer: half of `repeats` on each side (the odd one before),
  and at least one on each side, so that both ends of a drifting machine's
  run are seen.
  """
  return max(1, (repeats + 1) // 2), max(1, repeats // 2)


def _kernel_batches(s: Settings) -> list[int]:
  """The batches the ig, pgd, train and attack records of `s` run layers at.

  The terms of the records `run` will make (`kernel_floor_terms`), from the
  settings alone; --pgd_batch where none of those workloads runs.
  """
  planned = []
  if "ig" in s.workloads:
    planned += [dict(workload="ig", batch=s.ig_batch, ig_steps=steps,
                     chunk_size_used=_chunk_size_used(
                         s.chunk_size or "auto", s.ig_batch, steps))
                for steps in s.ig_steps]
  if "pgd" in s.workloads:
    planned += [dict(workload="pgd", batch=s.pgd_batch, pgd_steps=steps)
                for steps in s.pgd_steps]
  if "train" in s.workloads:
    planned += [dict(workload="train", batch=s.train_batch, num_devices=1,
                     objective=objective, hyper=_reported_hyper(
                         train.objective_hyper(_objective_config(objective,
                                                                 s))))
                for objective in s.objectives]
  if "attack" in s.workloads:
    planned.append(_attack_sizes(s, s.attack_batch))
  return sorted({t["batch"] for r in planned for t in kernel_floor_terms(r)}
                or {s.pgd_batch})


def _kernel_sums(kernel_records) -> dict[int, dict[str, float]]:
  """`{batch: {key: seconds}}`, the keys `_FLOOR_KEYS`."""
  sums = {}
  for r in kernel_records:
    entry = sums.setdefault(r["batch"], dict.fromkeys(_FLOOR_KEYS, 0.0))
    entry[r["op"]] += r["median_s"]
    if r["layer_index"] == 0 and r["op"] in ("input_grad",
                                             "input_grad_transpose"):
      entry["first_" + r["op"]] += r["median_s"]
  return sums


def attach_kernel_floors(records, kernel_records) -> None:
  """Adds `kernel_floor_s`, its terms and `over_kernel_floor` to `records`.

  Args:
    records: the run's records; ig, pgd, train and attack records at the
      top level (not sweeps) whose terms (`kernel_floor_terms`) were all
      timed get the fields.
    kernel_records: the kernels workload's records.
  """
  sums = _kernel_sums(kernel_records)
  for r in records:
    terms = kernel_floor_terms(r) if r.get("sweep") is None else None
    if not terms or any(t["batch"] not in sums for t in terms):
      continue
    floor = sum(t["times"] * sum(t[k] * sums[t["batch"]][k]
                                 for k in _FLOOR_KEYS) for t in terms)
    r["kernel_floor_terms"] = terms
    r["kernel_floor_s"] = floor
    r["over_kernel_floor"] = r["median_s"] / floor


def matmul_peak(size: int, settings: Settings) -> dict[str, Any]:
  """The measured float32 matmul FLOP/s: `2 n^3 / median` of `jnp.dot`.

  Args:
    size: n, the side of the square matrices.
    settings: `rng_seed` is read; at least 2 warm-up and 10 timed runs.

  Returns:
    The record; `flops_per_s` is the peak, `fraction_of_peak` 1.
  """
  ka, kb = jax.random.split(jax.random.key(settings.rng_seed))
  a = jax.random.normal(ka, (size, size), jnp.float32)
  b = jax.random.normal(kb, (size, size), jnp.float32)
  # Cheap, and every fraction_of_peak divides by it: never cold, never one
  # run, whatever --warmup/--repeats say for the long workloads.
  settings = dataclasses.replace(settings, warmup=max(2, settings.warmup),
                                 repeats=max(10, settings.repeats))
  record = benchmark_fn(
      f"matmul_peak n={size}", jax.jit(jnp.dot), (a, b), settings=settings,
      peak=float("nan"), workload="matmul_peak", sweep=None, matmul_size=size,
      precision="default")
  record["flops_analytic"] = 2.0 * size ** 3
  record["flops_per_s"] = record["flops_analytic"] / record["median_s"]
  record["fraction_of_peak"] = 1.0
  return record


def _device_counts(available: int) -> list[int]:
  counts, n = [], 1
  while n <= available:
    counts.append(n)
    n *= 2
  if counts[-1] != available:
    counts.append(available)
  return counts


THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_huge_pages(path: str = THP_MODE_FILE) -> Optional[str]:
  """The kernel's transparent-huge-page mode ("always", "madvise", "never").

  With glibc's `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` and the mode
  "madvise", XLA:CPU's large temporaries are mapped with huge pages, which
  changed a run's time (BUILD.md, Performance): the header records both.

  Args:
    path: the kernel's setting (Linux); elsewhere it does not exist.

  Returns:
    The bracketed (active) mode, or None where the file is missing or
    unreadable.

  References:
    Linux, Documentation/admin-guide/mm/transhuge.rst; glibc manual,
    "Memory Allocation Tunables" (`glibc.malloc.hugetlb`).

  Example:
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
    ...   _ = f.write("always [madvise] never"); f.flush()
    ...   transparent_huge_pages(f.name)
    'madvise'
    >>> transparent_huge_pages("/no/such/file") is None
    True
  """
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def header(settings: Settings) -> dict[str, Any]:
  """Versions, device, host, date and settings of a run."""
  device = jax.devices()[0]
  return dict(
      jax_version=jax.__version__, jaxlib_version=jaxlib.__version__,
      python_version=platform.python_version(),
      platform=device.platform, device_kind=device.device_kind,
      device_count=jax.device_count(),
      local_device_count=jax.local_device_count(),
      cpu_count=os.cpu_count(), hostname=socket.gethostname(),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
      transparent_huge_pages=transparent_huge_pages(),
      settings=dataclasses.asdict(settings),
  )


def run(settings: Settings) -> dict[str, Any]:
  """Runs the workloads and sweeps of `settings`; returns the JSON object.

  Args:
    settings: what to run (checked first).

  Returns:
    `{"header": ..., "peak_flops_per_s": ..., "records": [...]}`, one record
    per workload and sweep point (fields in the module docstring).

  Raises:
    ValueError: a bad setting (see `check_settings`).
  """
  check_settings(settings)
  s = dataclasses.replace(
      settings,
      matmul_size=_platform_default(settings.matmul_size, 2048, 8192),
      attack_batch=_platform_default(settings.attack_batch, 4, 32),
      workloads=tuple(settings.workloads), sweeps=tuple(settings.sweeps),
      objectives=tuple(settings.objectives),
      ig_steps=tuple(settings.ig_steps), pgd_steps=tuple(settings.pgd_steps),
      sweep_batch_sizes=tuple(settings.sweep_batch_sizes),
      sweep_ig_steps=tuple(settings.sweep_ig_steps))
  result = {"header": header(s)}
  # The peak is always measured: every other record's fraction_of_peak uses it.
  peak_record = matmul_peak(s.matmul_size, s)
  peak = peak_record["flops_per_s"]
  result["peak_flops_per_s"] = peak
  records = [peak_record]
  w = _Workloads(s, peak)
  result["header"]["analytic_flops_per_example"] = w.analytic
  result["header"]["image_shape"] = list(w.image_shape)
  top = dict(sweep=None)
  kernel_plan = None
  if "kernels" in s.workloads:
    # Timed half before the workloads and half after them, so that a shared
    # machine's drift affects the floors and the records alike; at least once
    # on each side (--repeats=1, as for the attack, times each kernel twice).
    kernel_plan = w.kernel_plan(_kernel_batches(s))
    kernels_before, kernels_after = _split_repeats(s.repeats)
    w.time_kernels(kernel_plan, warmup=max(1, s.warmup),
                   repeats=kernels_before)
  if "ig" in s.workloads:
    for steps in s.ig_steps:
      name = f"ig B={s.ig_batch} m={steps}" + (
          f" chunk={s.chunk_size}" if s.chunk_size else "")
      records.append(w.ig(s.ig_batch, steps, s.chunk_size or "auto",
                          name=name, **top))
  if "pgd" in s.workloads:
    for steps in s.pgd_steps:
      records.append(dict(w.pgd(s.pgd_batch, steps), **top))
  if "train" in s.workloads:
    for objective in s.objectives:
      records.append(w.train_step(
          objective, s.train_batch, 1, name=f"train {objective} "
          f"B={s.train_batch}", **top))
  if "attack" in s.workloads:
    records.extend(dict(r, **top) for r in w.attack(s.attack_batch))
  if "loop" in s.workloads:
    records.append(dict(w.loop(s.loop_objective, s.train_batch), **top))
  if kernel_plan:
    w.time_kernels(kernel_plan, warmup=0, repeats=kernels_after)
    kernel_records = [dict(r, **top) for r in w.kernel_records(kernel_plan)]
    attach_kernel_floors(records, kernel_records)
    records.extend(kernel_records)

  if "batch" in s.sweeps:
    for batch in s.sweep_batch_sizes:
      records.append(w.ig(batch, s.ig_steps[0], s.chunk_size or "auto",
                          name=f"sweep ig B={batch} m={s.ig_steps[0]}",
                          sweep="batch"))
    for batch in s.sweep_batch_sizes:
      records.append(w.train_step(
          s.sweep_objective, batch, 1,
          name=f"sweep train {s.sweep_objective} B={batch}", sweep="batch"))
  if "ig_steps" in s.sweeps:
    chunk = s.chunk_size or DEFAULT_SWEEP_CHUNK
    for steps in s.sweep_ig_steps:
      for chunk_size in (None, chunk):
        records.append(w.ig(
            s.ig_batch, steps, chunk_size, sweep="ig_steps",
            name=f"sweep ig B={s.ig_batch} m={steps}"
            + (f" chunk={chunk_size}" if chunk_size else "")))
  if "devices" in s.sweeps:
    points = []
    for n in _device_counts(jax.local_device_count()):
      points.append(w.train_step(
          s.sweep_objective, s.train_batch, n, sweep="devices",
          name=f"sweep train {s.sweep_objective} {n} dev x B={s.train_batch}"))
    for point in points:
      point["scaling_efficiency"] = (point["steps_per_s"]
                                     / points[0]["steps_per_s"])
    records.extend(points)
  result["records"] = records
  return result


# --- Output. -----------------------------------------------------------------


def _scaled(value, factor):
  return None if value is None else value * factor


def _fmt(value, spec, missing="-"):
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return missing
  return format(value, spec)


def format_table(result: dict[str, Any]) -> str:
  """The records as a fixed-width table (one line per record).

  Args:
    result: what `run` returns.

  Returns:
    The table, with a title line naming the device and the peak.
  """
  h = result["header"]
  lines = [f"{h['device_kind']} ({h['platform']}, {h['device_count']} "
           f"device(s), {h['cpu_count']} CPUs); matmul peak "
           f"{result['peak_flops_per_s'] / 1e9:.1f} GFLOP/s (float32, default "
           "precision)"]
  columns = (f"{'workload':<42} {'compile s':>9} {'median [min-max] s':>27} "
             f"{'throughput':>14} {'GFLOP':>10} {'GFLOP/s':>9} {'% peak':>7} "
             f"{'mem MiB':>9}  notes")
  lines += [columns, "-" * len(columns)]
  for r in result["records"]:
    times = (f"{r['median_s']:.4g} [{r['min_s']:.4g}-{r['max_s']:.4g}]")
    if "seconds_per_example" in r:
      throughput = f"{r['seconds_per_example']:.4g} s/ex"
    elif r.get("examples_per_s"):
      throughput = f"{r['examples_per_s']:.4g} ex/s"
    else:
      throughput = "-"
    notes = []
    if r.get("sweep") == "ig_steps" and r.get("memory"):
      notes.append(f"temp {r['memory']['temp_size_in_bytes'] / _MIB:.1f} MiB")
    if "scaling_efficiency" in r:
      notes.append(f"{r['steps_per_s']:.3g} steps/s, efficiency "
                   f"{r['scaling_efficiency']:.2f}")
    if "loop_efficiency" in r:
      notes.append(f"{r['steps_per_s']:.3g} steps/s; the step alone "
                   f"{1 / r['step_alone_s']:.3g} ({r['loop_efficiency']:.2f})")
    if "speedup_batched_vs_one_at_a_time" in r:
      notes.append(f"batched is {r['speedup_batched_vs_one_at_a_time']:.2f}x "
                   "faster per example")
    if "kernel_floor_s" in r:
      notes.append(f"kernels alone {r['kernel_floor_s']:.4g} s (median "
                   f"{r['over_kernel_floor']:.2f}x)")
    if r["flops_method"] != "xla_cost_analysis":
      notes.append("loop-corrected FLOPs")
    gflop = _scaled(r.get("flops"), 1e-9)
    gflops = _scaled(r.get("flops_per_s"), 1e-9)
    percent = _scaled(r.get("fraction_of_peak"), 100)
    lines.append(
        f"{r['name'][:42]:<42} {r['compile_s']:>9.3f} {times:>27} "
        f"{throughput:>14} {_fmt(gflop, '10.4g'):>10} "
        f"{_fmt(gflops, '9.4g'):>9} {_fmt(percent, '7.1f'):>7} "
        f"{_fmt(r['peak_memory_mib'], '9.1f'):>9}  {'; '.join(notes)}")
  return "\n".join(lines)


def to_json(value):
  """`value` with tuples as lists and non-finite floats as None (valid JSON).

  Args:
    value: what `run` returns (or any part of it).

  Returns:
    The same structure, ready for `json.dump(..., allow_nan=False)`.
  """
  if isinstance(value, dict):
    return {str(k): to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.bool_):
    return bool(value)
  return value


# --- The binary. -------------------------------------------------------------

_DEFAULTS = Settings()
_WORKLOADS = flags.DEFINE_list(
    "workloads", list(WORKLOADS), "Workloads to run: "
    f"{', '.join(WORKLOADS)} (matmul_peak always runs: the others' "
    "fraction_of_peak needs it).")
_MODEL = flags.DEFINE_string(
    "model", _DEFAULTS.model, f"Model: {', '.join(models.MODEL_NAMES)}.")
_REPEATS = flags.DEFINE_integer("repeats", _DEFAULTS.repeats,
                                "Timed runs per workload (>= 1).")
_WARMUP = flags.DEFINE_integer("warmup", _DEFAULTS.warmup,
                               "Untimed runs after compiling (>= 0).")
_MATMUL_SIZE = flags.DEFINE_integer(
    "matmul_size", None, "Side of the matmul_peak matrices (default: 2048 "
    "on CPU, 8192 on GPU/TPU).")
_IG_BATCH = flags.DEFINE_integer("ig_batch", _DEFAULTS.ig_batch,
                                 "Batch of the ig workload.")
_IG_STEPS = flags.DEFINE_list(
    "ig_steps", [str(v) for v in _DEFAULTS.ig_steps],
    "IG points of the ig workload, one record each (the first is also the "
    "batch sweep's).")
_CHUNK_SIZE = flags.DEFINE_integer(
    "chunk_size", None, "IG points evaluated at once in the ig workload "
    "(default: 'auto', rar_jax.attribution.auto_chunk_size: all on GPU/TPU, "
    "about 64 images per chunk on CPU); the ig_steps sweep compares all at "
    f"once with chunks of this size (or {DEFAULT_SWEEP_CHUNK} when unset).")
_PGD_BATCH = flags.DEFINE_integer("pgd_batch", _DEFAULTS.pgd_batch,
                                  "Batch of the pgd workload.")
_PGD_STEPS = flags.DEFINE_list(
    "pgd_steps", [str(v) for v in _DEFAULTS.pgd_steps],
    "Steps of the pgd workload, one record each.")
_TRAIN_BATCH = flags.DEFINE_integer(
    "train_batch", _DEFAULTS.train_batch, "Batch of the train steps (per "
    "device in the devices sweep).")
_TRAIN_IG_STEPS = flags.DEFINE_integer(
    "train_ig_steps", _DEFAULTS.train_ig_steps,
    "m, the IG points of the IG-NORM / IG-SUM-NORM regulariser.")
_TRAIN_APPROX_FACTOR = flags.DEFINE_integer(
    "train_approx_factor", _DEFAULTS.train_approx_factor,
    "approx_factor: the inner PGD uses m / approx_factor IG points.")
_TRAIN_PGD_STEPS = flags.DEFINE_integer(
    "train_pgd_steps", _DEFAULTS.train_pgd_steps,
    "PGD steps of the training objectives' inner maximisation.")
_OBJECTIVES = flags.DEFINE_list(
    "objectives", list(TRAIN_OBJECTIVES),
    f"Objectives of the train workload: {', '.join(TRAIN_OBJECTIVES)}.")
_ATTACK_BATCH = flags.DEFINE_integer(
    "attack_batch", None, "Examples of the attack workload (default: 4 on "
    "CPU, 32 on GPU/TPU).")
_ATTACK_STEPS = flags.DEFINE_integer("attack_steps", _DEFAULTS.attack_steps,
                                     "Steps of the attribution attack.")
_ATTACK_RESTARTS = flags.DEFINE_integer(
    "attack_restarts", _DEFAULTS.attack_restarts,
    "Restarts of the attribution attack (batched with the examples).")
_ATTACK_IG_STEPS = flags.DEFINE_integer(
    "attack_ig_steps", _DEFAULTS.attack_ig_steps,
    "IG points of every saliency map of the attack.")
_ATTACK_CHUNK_SIZE = flags.DEFINE_integer(
    "attack_chunk_size", None, "IG points evaluated at once in the attack's "
    "saliency maps (default: 'auto', as rar_jax's evaluation).")
_EIGEN_CONVS = flags.DEFINE_bool(
    "eigen_convs", True, "Run XLA:CPU convolutions on Eigen, as the training "
    "and evaluation binaries do (rar_jax.runtime.prefer_eigen_convolutions); "
    "--noeigen_convs keeps XLA's default (YNNPACK). The header's xla_flags "
    "records what was used.")
_ATTACK_SINGLE = flags.DEFINE_bool(
    "attack_single", False, "Also run the attack one example at a time and "
    "report the batched speed-up per example.")
_LOOP_OBJECTIVE = flags.DEFINE_string(
    "loop_objective", _DEFAULTS.loop_objective,
    f"Objective of the loop workload: {', '.join(TRAIN_OBJECTIVES)}.")
_LOOP_STEPS = flags.DEFINE_integer(
    "loop_steps", _DEFAULTS.loop_steps, "Steps the loop workload trains (a "
    "multiple of --loop_log_every, at least twice it).")
_LOOP_LOG_EVERY = flags.DEFINE_integer(
    "loop_log_every", _DEFAULTS.loop_log_every, "Steps per timed window of "
    "the loop workload (the trainer's log_every_steps; the first window, "
    "which compiles, is not timed).")
_SWEEPS = flags.DEFINE_list(
    "sweeps", [], f"Sweeps to run: {', '.join(SWEEPS)} (default: none).")
_SWEEP_BATCH_SIZES = flags.DEFINE_list(
    "sweep_batch_sizes", [str(v) for v in _DEFAULTS.sweep_batch_sizes],
    "Batch sizes of the batch sweep.")
_SWEEP_IG_STEPS = flags.DEFINE_list(
    "sweep_ig_steps", [str(v) for v in _DEFAULTS.sweep_ig_steps],
    "IG points of the ig_steps sweep.")
_SWEEP_OBJECTIVE = flags.DEFINE_string(
    "sweep_objective", _DEFAULTS.sweep_objective,
    "Objective of the train step in the batch and devices sweeps.")
_PARALLEL = flags.DEFINE_string(
    "parallel", _DEFAULTS.parallel, "Data parallelism of the train steps: "
    f"{', '.join(train.PARALLEL)} (as rar_jax.train).")
_DATA_NPZ = flags.DEFINE_string(
    "data_npz", None, "Images to use instead of the embedded MNIST sample: "
    "a .npz file with 'images' and 'labels' (e.g. "
    "/work/shared/data/mnist_10k.npz).")
_RNG_SEED = flags.DEFINE_integer("rng_seed", _DEFAULTS.rng_seed,
                                 "Seed of the parameters and random starts.")
_OUTPUT_JSON = flags.DEFINE_string(
    "output_json", None, "Write the header and records to this JSON file.")


def _int_list(name, values):
  out = []
  for v in values:
    try:
      out.append(int(v))
    except ValueError:
      raise ValueError(f"--{name}={','.join(values)} has {v!r}, not an int; "
                       "accepted: a comma-separated list of ints >= 1."
                       ) from None
  return tuple(out)


def settings_from_flags() -> Settings:
  """The `Settings` of the parsed flags (int lists parsed, not yet checked).

  Returns:
    The settings.

  Raises:
    ValueError: a list flag with a value that is not an int.
  """
  return Settings(
      workloads=tuple(_WORKLOADS.value), model=_MODEL.value,
      repeats=_REPEATS.value, warmup=_WARMUP.value,
      matmul_size=_MATMUL_SIZE.value, ig_batch=_IG_BATCH.value,
      ig_steps=_int_list("ig_steps", _IG_STEPS.value),
      chunk_size=_CHUNK_SIZE.value, pgd_batch=_PGD_BATCH.value,
      pgd_steps=_int_list("pgd_steps", _PGD_STEPS.value),
      train_batch=_TRAIN_BATCH.value,
      train_ig_steps=_TRAIN_IG_STEPS.value,
      train_approx_factor=_TRAIN_APPROX_FACTOR.value,
      train_pgd_steps=_TRAIN_PGD_STEPS.value,
      objectives=tuple(_OBJECTIVES.value), attack_batch=_ATTACK_BATCH.value,
      attack_steps=_ATTACK_STEPS.value, attack_restarts=_ATTACK_RESTARTS.value,
      attack_ig_steps=_ATTACK_IG_STEPS.value,
      attack_single=_ATTACK_SINGLE.value,
      attack_chunk_size=_ATTACK_CHUNK_SIZE.value,
      loop_objective=_LOOP_OBJECTIVE.value, loop_steps=_LOOP_STEPS.value,
      loop_log_every=_LOOP_LOG_EVERY.value, sweeps=tuple(_SWEEPS.value),
      sweep_batch_sizes=_int_list("sweep_batch_sizes",
                                  _SWEEP_BATCH_SIZES.value),
      sweep_ig_steps=_int_list("sweep_ig_steps", _SWEEP_IG_STEPS.value),
      sweep_objective=_SWEEP_OBJECTIVE.value, parallel=_PARALLEL.value,
      data_npz=_DATA_NPZ.value, rng_seed=_RNG_SEED.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _EIGEN_CONVS.value:
    runtime.prefer_eigen_convolutions()
  try:
    settings = settings_from_flags()
    check_settings(settings)
  except ValueError as err:
    # A bad flag value: the message names it and what is accepted.
    sys.exit(f"benchmark.py: error: {err}")
  result = run(settings)
  result["header"]["flags"] = {
      holder.name: holder.value for holder in globals().values()
      if isinstance(holder, flags.FlagHolder)}
  print(format_table(result))
  if _OUTPUT_JSON.value:
    folder = os.path.dirname(os.path.abspath(_OUTPUT_JSON.value))
    os.makedirs(folder, exist_ok=True)
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(to_json(result), f, indent=2, allow_nan=False)
      f.write("\n")
    logging.info("Wrote %s", _OUTPUT_JSON.value)


if __name__ == "__main__":
  app.run(main)

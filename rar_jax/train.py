"""Training: `train_and_evaluate(config, workdir)`, data-parallel over devices.

The per-device step (`train_step`) is written once, with the gradient
collective over the axis name `"batch"`, and run under `jax.pmap` (default) or
`jax.shard_map` over a one-axis device mesh (`config.parallel`). The host loop
is the only stateful code: it feeds deterministic batches (a pure function of
the seed and the step), logs, writes `metrics.jsonl` and TensorBoard events,
and saves Orbax checkpoints in `workdir/checkpoints`; a rerun with the same
workdir resumes from the last one and continues to the same result.

  from experiments.configs import quickstart
  metrics = train_and_evaluate(quickstart.get_config(), "/tmp/rar")

Config fields (see `default_config` for defaults):
  seed, batch_size (global), num_train_steps, log_every_steps,
  eval_every_steps, checkpoint_every_steps, max_checkpoints_to_keep,
  parallel ("pmap" | "shard_map"), num_devices (None: all local devices),
  dataset.{name, data_dir, train_split, test_split, num_classes, pixel_max},
  model.{name, activation},
  objective.{name, epsilon, step_size, num_steps, m, approx_factor, lam,
             gamma, clip_min, clip_max, reduction, epsilon_warmup_steps},
  optimizer.{name ("adam" | "sgd"), learning_rate, lr_boundaries,
             lr_values, momentum, weight_decay},
  eval.{num_examples, batch_size, pgd_num_examples, pgd_epsilon,
        pgd_step_size, pgd_num_steps, pgd_num_restarts},
  attack.{k_top, eval_k, num_steps, step_size, epsilon, num_restarts,
          num_ig_steps, saliency, quantize, batch_size, num_examples,
          ig_chunk_size, num_figure_examples} (read by rar_jax.evaluation).
"""

import collections
import functools
import json
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable, NamedTuple, Optional

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from rar_jax import data as data_lib
from rar_jax import metrics as metrics_lib
from rar_jax import models
from rar_jax import objectives
from rar_jax import runtime
from rar_jax import summary
from rar_jax import vma
from rar_jax.attacks import pgd

AXIS = "batch"
PARALLEL = ("pmap", "shard_map")
OPTIMIZERS = ("adam", "sgd")
_FINAL_KEY = "eval/adversarial_accuracy"   # only the final evaluation logs it
# Config sections that must not change when a run resumes from a workdir.
_FROZEN = ("seed", "batch_size", "dataset", "model", "objective", "optimizer")


def default_config() -> ml_collections.ConfigDict:
  """Every field `train_and_evaluate` reads, with defaults (plain values).

  Returns:
    A `ConfigDict` with the fields of the module docstring; the defaults are
    the paper's MNIST NATURAL settings on the embedded sample.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (spec
    Sec. 3.2 hyper-parameters, Sec. 4 evaluation).

  Example:
    >>> c = default_config()
    >>> c.batch_size, c.model.name, c.objective.name, c.objective.epsilon
    (50, 'small_cnn', 'natural', 0.3)
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 50
  c.num_train_steps = 1000
  c.log_every_steps = 50
  c.eval_every_steps = 0            # 0: evaluate at the end only
  c.checkpoint_every_steps = 500
  c.max_checkpoints_to_keep = 3
  c.parallel = "pmap"
  c.num_devices = ml_collections.FieldReference(None, field_type=int)

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "embedded_mnist"
  c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.dataset.train_split = "train"
  c.dataset.test_split = "test"
  c.dataset.num_classes = 10
  # Integer pixels 0..255 are scaled to [0, pixel_max]; None: the source's
  # default (rar_jax.data: [0, 1] for MNIST sources, [0, 255] for the rest).
  c.dataset.pixel_max = ml_collections.FieldReference(None, field_type=float)

  c.model = ml_collections.ConfigDict()
  c.model.name = "small_cnn"
  c.model.activation = ml_collections.FieldReference(None, field_type=str)

  c.objective = ml_collections.ConfigDict()
  c.objective.name = "natural"
  c.objective.epsilon = 0.3
  c.objective.step_size = 0.01
  c.objective.num_steps = 40
  c.objective.m = 50
  c.objective.approx_factor = 5
  c.objective.lam = 1.0
  c.objective.gamma = 1.0
  c.objective.clip_min = ml_collections.FieldReference(0.0, field_type=float)
  c.objective.clip_max = ml_collections.FieldReference(1.0, field_type=float)
  c.objective.reduction = "sum"
  c.objective.epsilon_warmup_steps = 0   # 0: the paper (see train_step)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-4
  c.optimizer.lr_boundaries = ()   # piecewise constant: lr_values[i] until
  c.optimizer.lr_values = ()       # lr_boundaries[i] (then the last value)
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 0.0   # wd * sum(1/2 ||W||^2) over kernels

  c.eval = ml_collections.ConfigDict()
  c.eval.num_examples = ml_collections.FieldReference(None, field_type=int)
  c.eval.batch_size = 100
  c.eval.pgd_num_examples = ml_collections.FieldReference(500, field_type=int)
  c.eval.pgd_epsilon = ml_collections.FieldReference(None, field_type=float)
  c.eval.pgd_step_size = ml_collections.FieldReference(None, field_type=float)
  c.eval.pgd_num_steps = ml_collections.FieldReference(None, field_type=int)
  # Restarts > 1 (evaluation binary only): an example counts as robust only if
  # PGD fails from every random start, a tighter bound than the paper's one.
  c.eval.pgd_num_restarts = 1

  # The top-k attribution attack of the evaluation binary (rar_jax.evaluation;
  # spec section 4.2). Not read by training.
  c.attack = ml_collections.ConfigDict()
  c.attack.k_top = 200              # pixels of the mask the attack empties
  c.attack.eval_k = 100             # k of the reported top-k intersection
  c.attack.num_steps = 100
  c.attack.step_size = 0.01
  c.attack.epsilon = ml_collections.FieldReference(None, field_type=float)
  c.attack.num_restarts = 1         # 1: the paper's protocol (starts at x)
  c.attack.num_ig_steps = 100
  c.attack.saliency = "ig"          # "ig" | "gradient"
  c.attack.quantize = False         # truncate pixels to integers every step
  # Examples per batch, over all devices (fewer examples: one batch of them).
  c.attack.batch_size = 100
  c.attack.num_examples = ml_collections.FieldReference(None, field_type=int)
  # IG points per chunk; None: by device (`attacks.attack_chunk_size`).
  c.attack.ig_chunk_size = ml_collections.FieldReference(None, field_type=int)
  c.attack.num_figure_examples = 4
  return c


# --- Pieces built from the config (names resolve here, once). ---------------


def objective_hyper(config) -> dict[str, Any]:
  """The objective's hyper-parameter keywords from `config.objective`.

  Args:
    config: a config with the fields of `default_config()`.

  Returns:
    `{key: config.objective[key]}` for every key of `objectives.HYPER_KEYS`.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (spec
    Sec. 3.2).

  Example:
    >>> hyper = objective_hyper(default_config())
    >>> hyper["epsilon"], hyper["m"], hyper["approx_factor"], hyper["reduction"]
    (0.3, 50, 5, 'sum')
  """
  return {k: config.objective[k] for k in objectives.HYPER_KEYS}


def learning_rate_schedule(opt_config):
  """A constant or piecewise-constant learning rate (plain config values).

  Args:
    opt_config: `config.optimizer` (`learning_rate`, `lr_boundaries`,
      `lr_values`).

  Returns:
    `learning_rate` (a float) without boundaries, else an optax schedule,
    update count -> rate, where `lr_values[i]` applies up to and including
    update `lr_boundaries[i]` (TF's `piecewise_constant`).

  Raises:
    ValueError: `lr_values` is not one longer than `lr_boundaries`.

  References:
    RAR spec Sec. 3.2 (the GTSRB/Flower schedules); TensorFlow,
    `tf.compat.v1.train.piecewise_constant`.

  Example:
    >>> c = default_config()
    >>> c.optimizer.update(lr_boundaries=(100,), lr_values=(1e-3, 1e-4))
    >>> schedule = learning_rate_schedule(c.optimizer)
    >>> [round(float(schedule(count)), 6) for count in (100, 101)]
    [0.001, 0.0001]
  """
  boundaries = list(opt_config.lr_boundaries)
  values = list(opt_config.lr_values)
  if not boundaries and not values:
    return opt_config.learning_rate
  if len(values) != len(boundaries) + 1:
    raise ValueError(
        f"optimizer.lr_values={values} must have one more entry than "
        f"optimizer.lr_boundaries={boundaries} (a rate before, between and "
        "after the boundaries).")
  # TF's piecewise_constant gives values[i] while step <= boundaries[i];
  # optax switches once the update count reaches a boundary: shift by one.
  return optax.piecewise_constant_schedule(
      values[0],
      {b + 1: v / u for b, u, v in zip(boundaries, values, values[1:])})


def create_optimizer(opt_config) -> optax.GradientTransformation:
  """Adam (the paper's MNIST setting) or SGD with momentum (GTSRB, Flower).

  Args:
    opt_config: `config.optimizer` (`name`, `momentum` and the learning rate
      fields of `learning_rate_schedule`).

  `optax.adam` adds its epsilon after the bias correction, where TF's
  `AdamOptimizer` (the original code's) adds it before (BUILD.md,
  Deviations).

  Returns:
    An `optax.GradientTransformation`.

  Raises:
    ValueError: an unknown optimiser name or a bad schedule.

  References:
    Kingma, Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015;
    RAR spec Sec. 3.2 (optimiser per dataset).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> tx = create_optimizer(default_config().optimizer)   # Adam, lr 1e-4
    >>> params = {"w": jnp.zeros(2)}
    >>> updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    >>> jnp.round(optax.apply_updates(params, updates)["w"], 6)
    Array([-0.0001, -0.0001], dtype=float32)
  """
  lr = learning_rate_schedule(opt_config)
  if opt_config.name == "adam":
    return optax.adam(lr)
  if opt_config.name == "sgd":
    return optax.sgd(lr, momentum=opt_config.momentum or None)
  raise ValueError(f"Unknown optimizer {opt_config.name!r}; accepted: "
                   f"{', '.join(OPTIMIZERS)}.")


def _is_kernel(path) -> bool:
  return getattr(path[-1], "key", None) == "kernel"


def validate_config(config) -> None:
  """Fails before any data loading or compilation on a bad config.

  Args:
    config: a config with the fields of `default_config()`.

  Raises:
    ValueError: the first bad field, named with its value and the accepted
      values (objective hyper-parameters, model, optimiser, sizes, a batch
      that does not split over the devices).

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (spec
    Sec. 3.2 hyper-parameters).

  Example:
    >>> c = default_config()
    >>> c.parallel = "xmap"
    >>> validate_config(c)
    Traceback (most recent call last):
      ...
    ValueError: Unknown parallel='xmap'; accepted: pmap, shard_map.
  """
  if config.parallel not in PARALLEL:
    raise ValueError(f"Unknown parallel={config.parallel!r}; accepted: "
                     f"{', '.join(PARALLEL)}.")
  objectives.check_hyper(config.objective.name, objective_hyper(config))
  models.get_model(config.model.name, num_classes=config.dataset.num_classes,
                   activation=config.model.activation)
  create_optimizer(config.optimizer)
  for field in ("batch_size", "num_train_steps", "log_every_steps"):
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{field}={value!r} is not accepted; it must be an "
                       "int >= 1.")
  warmup = config.objective.epsilon_warmup_steps
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
    raise ValueError(f"objective.epsilon_warmup_steps={warmup!r} is not "
                     "accepted; it must be an int >= 0 (0: no warm-up).")
  check_divisible("batch_size", config.batch_size, config)
  check_divisible("eval.batch_size", config.eval.batch_size, config)


def check_divisible(field: str, batch_size: int, config) -> None:
  """A batch must split evenly over all devices of all processes.

  Args:
    field: the config field's name, for the message.
    batch_size: its value, a global batch size.
    config: the config (`num_devices`; None: all local devices).

  Raises:
    ValueError: `batch_size` is not a multiple of the devices of all
      processes (the message names both numbers).

  References:
    JAX documentation, `jax.pmap` and `jax.shard_map` (one equal shard per
    device).

  Example:
    >>> import jax
    >>> c = default_config()
    >>> check_divisible("batch_size", 8 * jax.device_count(), c)   # passes
  """
  num_devices = _num_devices(config) * jax.process_count()
  if batch_size % num_devices:
    raise ValueError(
        f"{field}={batch_size} is not divisible by the number of devices "
        f"{num_devices}; use a multiple of {num_devices} or set "
        "config.num_devices.")


def _num_devices(config) -> int:
  """This process's devices: `config.num_devices`, or all local ones."""
  available = jax.local_device_count()
  n = config.num_devices or available
  if not 1 <= n <= available:
    raise ValueError(f"num_devices={n} is not accepted; this host has "
                     f"{available} local devices.")
  if n != available and jax.process_count() > 1:
    # `_Parallel` spans every device of every process.
    raise ValueError(
        f"num_devices={n} is not accepted with {jax.process_count()} "
        f"processes: each process uses all its {available} local devices; "
        f"leave num_devices unset or set it to {available}.")
  return n


# --- The per-device step: collectives over AXIS only. ------------------------


def train_step(state, inputs, labels, keys, *, apply_fn, objective, hyper, tx,
               weight_decay=0.0, epsilon_warmup_steps=0):
  """One optimiser step on this device's shard of the global batch.

  Args:
    state: `{"params", "opt_state", "step"}`, replicated.
    inputs: `[B_d, *S]` this device's inputs.
    labels: `[B_d]` int labels.
    keys: `[B_d, 2]` uint32 PRNG key data, one key per example (random
      starts that do not depend on how the batch is split over devices).
    apply_fn: `(params, x) -> logits`.
    objective: a name in `objectives.OBJECTIVES`.
    hyper: the objective's hyper-parameters (`objectives.HYPER_KEYS`).
    tx: the optax optimiser.
    weight_decay: adds `weight_decay * W` to the gradient of every kernel
      (the gradient of `weight_decay * sum 1/2 ||W||^2`), once, after the
      collective.
    epsilon_warmup_steps: 0 (the paper), or grow the threat radius linearly
      from epsilon / epsilon_warmup_steps at the first step to `epsilon` at
      step epsilon_warmup_steps and after (a remedy for adversarial training
      that stalls at chance accuracy on a short budget; not in the paper).

  Returns:
    `(new_state, sums)` with `sums` the batch sums of the logged terms over
    all devices (and `count`), identical on every device, plus `grad_norm`
    and `nonfinite_params` (the number of non-finite updated parameters).

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (the
    training loop, spec Sec. 3.1); Flax `examples/imagenet` (`lax.pmean` of
    the gradients under `jax.pmap`).

  Example:
    >>> import functools, jax, jax.numpy as jnp, numpy as np, optax
    >>> apply_fn = lambda p, x: x.reshape(len(x), -1) @ p["kernel"]
    >>> params, tx = {"kernel": jnp.zeros((4, 3))}, optax.sgd(0.1)
    >>> state = {"params": params, "opt_state": tx.init(params), "step": 0}
    >>> p_step = jax.pmap(functools.partial(
    ...     train_step, apply_fn=apply_fn, objective="natural",
    ...     hyper=objective_hyper(default_config()), tx=tx),
    ...     axis_name=AXIS, devices=jax.local_devices()[:1])   # one device
    >>> on_device = lambda tree: jax.tree.map(lambda v: np.asarray(v)[None],
    ...                                       tree)  # [1, ...] per leaf
    >>> x, y = np.ones((1, 2, 2, 2, 1), np.float32), np.zeros((1, 2), np.int32)
    >>> keys = np.zeros((1, 2, 2), np.uint32)
    >>> state, sums = p_step(on_device(state), x, y, keys)
    >>> int(state["step"][0]), float(sums["count"][0]), float(sums["loss"][0])
    (1, 2.0, 2.197224...)
  """
  keys = jax.random.wrap_key_data(keys)
  if epsilon_warmup_steps:
    ramp = jnp.minimum(1.0, (state["step"] + 1) / epsilon_warmup_steps)
    hyper = dict(hyper, epsilon=hyper["epsilon"] * ramp)

  def loss_fn(params):
    return objectives.loss(objective, apply_fn, params, inputs, labels,
                           key=keys, **hyper)

  # Under `jax.shard_map` the state is replicated and the batch per device.
  # A gradient with respect to replicated parameters comes already summed
  # over the devices (by a psum at each use of them, inside loops too: in
  # every iteration of IG-NORM's IG scan), and the psum / pmean below would
  # then sum its identical copies again: n times the gradient on n devices.
  # With respect to this device's copy, the gradient is this device's, as
  # under `jax.pmap` (where nothing is cast), and the collective below is
  # the only sum.
  (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      vma.varying_like(state["params"], inputs))
  # The gradient of a batch sum is the sum of the devices' gradients; that of
  # a mean over equal shards, their mean. AXIS is the axis name given to the
  # `jax.pmap` / `jax.shard_map` in `compile_train_step`.
  if hyper["reduction"] == "sum":
    grads = lax.psum(grads, AXIS)
  else:
    grads = lax.pmean(grads, AXIS)
  if weight_decay:
    grads = jax.tree_util.tree_map_with_path(
        lambda path, g, w: g + weight_decay * w if _is_kernel(path) else g,
        grads, state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  adv_logits = apply_fn(state["params"], aux["adv_inputs"])
  sums = {
      "loss": jnp.sum(aux["loss"]),
      "ce": jnp.sum(aux["ce"]),
      "adv_ce": jnp.sum(aux["adv_ce"]),
      "reg": jnp.sum(aux["reg"]),
      "accuracy": jnp.sum(metrics_lib.accuracy(aux["logits"], labels)),
      "adv_accuracy": jnp.sum(metrics_lib.accuracy(adv_logits, labels)),
      "count": jnp.asarray(labels.shape[0], jnp.float32),
  }
  sums = lax.psum(sums, AXIS)
  sums["grad_norm"] = optax.tree.norm(grads)
  # Finite loss and gradient do not imply finite parameters (an overflowing
  # update): the loop refuses to checkpoint such parameters.
  sums["nonfinite_params"] = sum(
      jnp.sum(~jnp.isfinite(p)) for p in jax.tree.leaves(params)).astype(
          jnp.float32)
  new_state = {"params": params, "opt_state": opt_state,
               "step": state["step"] + 1}
  return new_state, sums


def eval_step(params, inputs, labels, mask, keys, *, apply_fn, attack=None):
  """Correct-prediction counts on this device's shard (psum over AXIS).

  Args:
    params: replicated parameters.
    inputs: `[B_d, *S]`.
    labels: `[B_d]`.
    mask: `[B_d]` 1 for real examples, 0 for padding.
    keys: `[B_d, 2]` uint32 PRNG key data for the PGD random start.
    apply_fn: `(params, x) -> logits`.
    attack: None, or keyword arguments of `pgd` (epsilon, step_size,
      num_steps, clip_min, clip_max) for the adversarial accuracy.

  Returns:
    `{"correct", "count"}` (and `"adv_correct"` with an attack), summed over
    the devices.

  References:
    RAR spec Sec. 4.1 (natural and PGD accuracy); Madry et al., "Towards
    Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.

  Example:
    >>> import functools, jax, jax.numpy as jnp, numpy as np
    >>> apply_fn = lambda p, x: x.reshape(len(x), -1) @ p   # linear, 2 classes
    >>> p_eval = jax.pmap(functools.partial(eval_step, apply_fn=apply_fn),
    ...                   axis_name=AXIS, devices=jax.local_devices()[:1])
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]).reshape(3, 1, 2, 1)
    >>> x, y, mask = data_lib.pad_batch(x, np.zeros(3, np.int32), batch_size=4)
    >>> out = p_eval(np.eye(2)[None], x[None], y[None], mask[None],
    ...              np.zeros((1, 4, 2), np.uint32))
    >>> float(out["correct"][0]), float(out["count"][0])    # padding masked
    (2.0, 3.0)
  """
  sums = {"correct": jnp.sum(mask * metrics_lib.accuracy(
      apply_fn(params, inputs), labels)), "count": jnp.sum(mask)}
  if attack is not None:
    ce = lambda x: objectives.cross_entropy(apply_fn(params, x), labels)
    adv = pgd(ce, inputs, key=jax.random.wrap_key_data(keys), **attack)
    sums["adv_correct"] = jnp.sum(mask * metrics_lib.accuracy(
        apply_fn(params, adv), labels))
  return lax.psum(sums, AXIS)


# --- Running a per-device function on all devices. ---------------------------


# Evaluation and attack steps one `_Parallel` keeps compiled (least recently
# used first out).
MAX_CACHED_STEPS = 8


class _Parallel:
  """Places data for, and runs, per-device functions under pmap or shard_map.

  `replicate` puts a host pytree (identical on every process) on every
  device, `shard` splits this process's part of a batch over its devices,
  `unreplicate` brings a replicated pytree back to the host. On several
  processes the collectives span every device of every process.
  """

  def __init__(self, kind: str, num_devices: int):
    self.kind = kind
    self.multi_process = jax.process_count() > 1
    if self.multi_process:
      self.local = jax.local_devices()
      devices = jax.devices()
    else:
      self.local = devices = jax.local_devices()[:num_devices]
    self.mesh = Mesh(np.array(devices), (AXIS,))
    self.local_mesh = Mesh(np.array(self.local), (AXIS,))
    self.n = len(self.local)
    self._compiled = collections.OrderedDict()

  def compile_cached(self, key, fn, *, num_replicated: int):
    """`compile(fn)`, once per `key`: everything `fn` closes over.

    The evaluations of a run, and later runs with the same programs
    (`_programs`), then reuse one traced and compiled program. The last
    `MAX_CACHED_STEPS` keys used are kept (a notebook sweeping attack
    settings would otherwise keep every compiled attack alive).
    """
    if key in self._compiled:
      self._compiled.move_to_end(key)
    else:
      self._compiled[key] = self.compile(fn, num_replicated=num_replicated)
      while len(self._compiled) > MAX_CACHED_STEPS:
        self._compiled.popitem(last=False)
    return self._compiled[key]

  def compile(self, fn, *, num_replicated: int, donate_state=False):
    """`fn(*replicated, *sharded)`; returns replicated outputs.

    `donate_state` donates the first argument (the train state), except
    under `pmap` on CPU. There XLA's copy insertion copied all 24 float
    buffers of the donated MNIST CNN state at the start of the train step (a
    fusion writing a new Adam moment in place runs beside one still reading
    the old one), which saved no memory and made the NATURAL step 1.2-1.5x
    slower (BUILD.md, Performance). `shard_map` on CPU donates without
    copies; `pmap` on GPU and TPU still donates (not measured there).
    """
    donate = (0,) if donate_state else ()
    if self.kind == "pmap":
      if self.local[0].platform == "cpu":
        donate = ()
      return jax.pmap(fn, axis_name=AXIS, donate_argnums=donate,
                      devices=None if self.multi_process else self.local)

    def wrapped(*args):
      return jax.shard_map(
          fn, mesh=self.mesh,
          in_specs=(P(),) * num_replicated + (P(AXIS),) * (
              len(args) - num_replicated),
          out_specs=P())(*args)

    return jax.jit(wrapped, donate_argnums=donate)

  def _put(self, tree, spec, mesh):
    sharding = NamedSharding(mesh, spec)
    if self.multi_process:
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(
              sharding, np.asarray(x)), tree)
    return jax.device_put(tree, sharding)

  def replicate(self, tree):
    if self.kind == "pmap":
      stacked = jax.tree.map(
          lambda x: np.broadcast_to(np.asarray(x), (self.n,) + np.shape(x)),
          tree)
      return self._put(stacked, P(AXIS), self.local_mesh)
    return self._put(tree, P(), self.mesh)

  def shard(self, tree):
    if self.kind == "pmap":
      per_device = jax.tree.map(
          lambda x: data_lib.shard_batch(x, num_devices=self.n,
                                         process_index=0, process_count=1),
          tree)
      return self._put(per_device, P(AXIS), self.local_mesh)
    return self._put(tree, P(AXIS), self.mesh)

  def unreplicate(self, tree):
    def first(x):
      value = np.asarray(x.addressable_shards[0].data)
      return value[0] if self.kind == "pmap" else value
    return jax.tree.map(first, tree)


class _Programs(NamedTuple):
  """What `train_and_evaluate` (and `evaluation.evaluate_checkpoint`) build
  from a config: `models.make_apply_fns`' functions, the optimiser, the
  placement and the train step."""
  init_fn: Callable[..., Any]
  apply_fn: Callable[..., Any]
  surrogate_apply_fn: Callable[..., Any]
  tx: optax.GradientTransformation
  parallel: _Parallel             # also holds the evaluation steps (cached)
  train_step: Callable[..., Any]  # pmapped or jitted


# The programs of the last `MAX_CACHED_PROGRAMS` settings trained in this
# process. JAX caches a traced and compiled function by the function object,
# so a rerun, a resume or a notebook loop with the same settings reuses the
# step instead of tracing and lowering it again (seconds per run).
MAX_CACHED_PROGRAMS = 4
_PROGRAMS: "collections.OrderedDict[str, _Programs]" = (
    collections.OrderedDict())


def _programs(config, num_devices: int) -> _Programs:
  """The model, optimiser, placement and train step `config` describes.

  Built once per program-defining settings (the model, the number of
  classes, the objective, the optimiser, the placement); the seed, data,
  step counts and evaluation settings do not change them.
  """
  c = json.loads(config.to_json())
  key = json.dumps(dict(
      model=c["model"], num_classes=c["dataset"]["num_classes"],
      objective=c["objective"], optimizer=c["optimizer"],
      parallel=c["parallel"], num_devices=num_devices,
      process_count=jax.process_count()), sort_keys=True)
  if key in _PROGRAMS:
    _PROGRAMS.move_to_end(key)
    return _PROGRAMS[key]
  init_fn, apply_fn, surrogate_apply_fn = models.make_apply_fns(
      config.model.name, num_classes=config.dataset.num_classes,
      activation=config.model.activation)
  tx = create_optimizer(config.optimizer)
  parallel = _Parallel(config.parallel, num_devices)
  step = parallel.compile(
      functools.partial(train_step, apply_fn=apply_fn,
                        objective=config.objective.name,
                        hyper=objective_hyper(config), tx=tx,
                        weight_decay=config.optimizer.weight_decay,
                        epsilon_warmup_steps=config.objective.
                        epsilon_warmup_steps),
      num_replicated=1, donate_state=True)
  programs = _PROGRAMS[key] = _Programs(init_fn, apply_fn, surrogate_apply_fn,
                                              tx, parallel, step)
  while len(_PROGRAMS) > MAX_CACHED_PROGRAMS:
    _PROGRAMS.popitem(last=False)
  return programs


def _process_slice(x):
  """This process's contiguous part of a global batch."""
  count, index = jax.process_count(), jax.process_index()
  per_host = len(x) // count
  return x[index * per_host:(index + 1) * per_host]


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _example_key_data(seed, step, batch_size, salt):
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), salt),
                           step)
  return jax.random.key_data(jax.random.split(key, batch_size))


@functools.lru_cache(maxsize=None)
def _host_cpu():
  """This process's first CPU device, or None if JAX has no CPU backend."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    return None


def _example_keys(seed: int, step: int, batch_size: int, salt: int = 0):
  """`[B, 2]` uint32 key data, one key per example of a global batch.

  The same on every host; plain arrays, so that they shard like the batch.
  `jax.random.wrap_key_data` turns them back into keys on the device. One
  compiled program per (seed, batch size, salt), the step an argument: the
  same bits as the eager ops, 0.05 ms a step against 1.4 ms (the training
  loop calls it every step). It runs on the CPU: on an accelerator it would
  queue behind the running training step, and fetching it would wait for
  that step.
  """
  with jax.default_device(_host_cpu()):   # None: JAX's default device
    return np.asarray(_example_key_data(seed, np.int32(step), batch_size,
                                        salt))


# The salt of the evaluation's PGD keys (AA; `evaluation.accuracies`' restart
# 0 is the same attack). Training's keys use 0, the attribution attack's 2.
_EVAL_PGD_SALT = 1


@functools.partial(jax.jit, static_argnums=(0, 2))
def _index_key_data(seed, indices, salt):
  base = jax.random.fold_in(jax.random.key(seed), salt)
  return jax.random.key_data(
      jax.vmap(lambda i: jax.random.fold_in(base, i))(indices))


def _index_keys(seed: int, indices, salt: int) -> np.ndarray:
  """`[B, 2]` uint32 key data: test example i's key from (seed, salt, i).

  The evaluation's random draws (PGD starts for AA, the attack's restarts),
  so that an example draws the same key in any batch and on any number of
  devices: the batch size then changes only the rounding. On the CPU, as
  `_example_keys`.
  """
  with jax.default_device(_host_cpu()):
    return np.asarray(_index_key_data(seed, np.asarray(indices, np.int32),
                                      salt))


def _loop_batch_size(batch_size: int, count: int, parallel) -> int:
  """The global batch of an evaluation loop over `count` examples.

  `batch_size`, or, with fewer examples, `count` rounded up to a multiple of
  the devices (`parallel.mesh.size`, every process's): a short evaluation
  (`--num_examples=4` with the presets' batch of 100) is not padded to a
  whole batch, which took as long as a whole one.
  """
  devices = parallel.mesh.size
  return min(batch_size, -(-max(count, 1) // devices) * devices)


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _example_key_block(seed, first_step, batch_size, salt, num_steps):
  steps = first_step + jnp.arange(num_steps, dtype=jnp.int32)
  return jax.vmap(lambda step: _example_key_data(seed, step, batch_size,
                                                 salt))(steps)


class _StepKeys:
  """`_example_keys` of the training loop's steps, computed ahead in blocks.

  On a CPU backend the CPU is also the device, so a key program dispatched
  while a training step runs queues behind it, and fetching its keys waits
  for that step: the host then prepares each step only after the previous
  one has finished. Here the keys of `BLOCK` steps come from one program,
  dispatched one block ahead, so the loop fetches keys that were computed
  long before; in the `loop` benchmark (NATURAL, batch 50, 2-core CPU) the
  time per step fell to 0.90-0.95x (BUILD.md, Performance). The same bits
  as `_example_keys`, step by step.
  """

  BLOCK = 64
  _LAST_STEP = 2 ** 31 - 1   # steps are int32, as in `_example_keys`

  def __init__(self, seed: int, batch_size: int, salt: int = 0):
    self._args = (seed, batch_size, salt)
    self._blocks = {}   # first step -> keys of BLOCK steps (maybe pending)

  def _dispatch(self, first):
    if first not in self._blocks:
      seed, batch_size, salt = self._args
      with jax.default_device(_host_cpu()):
        self._blocks[first] = _example_key_block(
            seed, np.int32(first), batch_size, salt, self.BLOCK)

  def __call__(self, step: int) -> np.ndarray:
    first = step - step % self.BLOCK
    self._dispatch(first)
    if first + self.BLOCK <= self._LAST_STEP:
      self._dispatch(first + self.BLOCK)   # the next block, ahead of its use
    for old in [f for f in self._blocks if f < first]:
      del self._blocks[old]
    block = self._blocks[first]
    if not isinstance(block, np.ndarray):
      block = self._blocks[first] = np.asarray(block)
    return block[step - first]


# --- Checkpoints, metrics files. ---------------------------------------------


def _checkpoint_manager(workdir, config):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.max_checkpoints_to_keep, create=True,
          enable_async_checkpointing=False))


def _save(manager, step, state):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager.save(step, args=ocp.args.StandardSave(state), force=True)
  manager.wait_until_finished()


class CheckpointError(ValueError):
  """A checkpoint that cannot be read, or that does not fit the config."""


def saved_steps(directory: str) -> list[int]:
  """The steps saved in an Orbax checkpoint folder, ascending.

  Only finished steps count: a save that was killed midway leaves a
  temporary folder (`STEP.orbax-checkpoint-tmp-*`), which is not a step.

  References:
    Orbax, `CheckpointManager` (one folder per step, written to a temporary
    name and renamed when complete).

  Example:
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> for name in ("20", "40", "60.orbax-checkpoint-tmp-7"):
    ...   os.makedirs(os.path.join(d, name))
    >>> saved_steps(d)
    [20, 40]
  """
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _drop_closed_loop_noise() -> None:
  """Silences the tracebacks orbax's threads print after a failed restore.

  When a restore fails, tensorstore callbacks still running in background
  threads can find their asyncio loop closed and report a harmless
  "RuntimeError: Event loop is closed" through `sys.unraisablehook`, after
  the real error has been raised. Only those are dropped.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_noise", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == (
        "Event loop is closed"):
      return
    previous(unraisable)

  hook.drops_closed_loop_noise = True
  sys.unraisablehook = hook


def _short(err: BaseException) -> str:
  reason = " ".join(str(err).split())
  reason = reason[:300] + (" ..." if len(reason) > 300 else "")
  return f"{type(err).__name__}: {reason}"


def _restore(workdir, config, target):
  """The newest readable checkpoint's state, or None if there is none.

  A damaged newest checkpoint (truncated or missing files: a save killed
  midway, a full disk) is moved to `workdir/checkpoints_corrupt/STEP` with a
  warning, and the previous one is tried; nothing is deleted. If no saved
  step can be read, nothing is moved and a `CheckpointError` names them all.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  steps = saved_steps(directory)
  if not steps:
    return None
  failures = []
  # The trainer's own manager (a read-only one logs warnings); a fresh one is
  # made after this, as the steps may have changed.
  with _checkpoint_manager(workdir, config) as mgr:
    for step in reversed(steps):
      try:
        state = mgr.restore(step, args=ocp.args.StandardRestore(target))
        break
      except Exception as err:  # pylint: disable=broad-except
        # Orbax and tensorstore raise ValueError, OSError, JSONDecodeError
        # and more for damaged files.
        _drop_closed_loop_noise()
        failures.append((step, _short(err)))
    else:
      raise CheckpointError(
          f"None of the checkpoints in {directory} can be restored: "
          + "; ".join(f"step {s}: {r}" for s, r in failures)
          + ". Nothing was changed. Move the folder away to start the run "
          "again from step 0, or use a new workdir.")
  if failures:
    corrupt = os.path.join(workdir, "checkpoints_corrupt")
    if jax.process_index() == 0:
      os.makedirs(corrupt, exist_ok=True)
      for bad, reason in failures:
        target_dir = os.path.join(corrupt, str(bad))
        if os.path.exists(target_dir):
          target_dir += f".{time.time_ns()}"
        shutil.move(os.path.join(directory, str(bad)), target_dir)
        logging.warning(
            "Checkpoint step %d in %s cannot be restored (%s); moved it to %s "
            "and resumed from step %d instead.", bad, directory, reason,
            target_dir, step)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("rar_jax_moved_corrupt_checkpoints")
  return state


def latest_checkpoint(workdir: str, step=None):
  """`(step, params)` of a run's latest (or given) checkpoint, on the host.

  Args:
    workdir: a training workdir (`workdir/checkpoints` is read).
    step: a saved step, or None for the latest.

  Returns:
    `(step, params)`; params as saved (nested dicts of numpy arrays).

  Raises:
    FileNotFoundError: no checkpoint in the workdir (or not that step).

  References:
    Orbax, `orbax.checkpoint.CheckpointManager`.

  Example:
    >>> import tempfile
    >>> latest_checkpoint(tempfile.mkdtemp())
    Traceback (most recent call last):
      ...
    FileNotFoundError: No checkpoints in ...: .../checkpoints does not exist.
    Train first, or check --workdir.
    >>> step, params = latest_checkpoint(
    ...     "/tmp/rar_quickstart")  # doctest: +SKIP
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoints in {workdir}: {directory} does "
                            "not exist. Train first, or check --workdir.")
  # Read-only, so that reading a run in progress never touches its files.
  options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                         save_interval_steps=0)
  with ocp.CheckpointManager(directory, options=options) as mgr:
    steps = mgr.all_steps()
    step = mgr.latest_step() if step is None else step
    if step is None or step not in steps:
      raise FileNotFoundError(
          f"No checkpoint {'' if step is None else step} in {directory}; "
          f"saved steps: {sorted(steps)}.")
    state = mgr.restore(step, args=ocp.args.StandardRestore())
  return int(step), state["params"]


def _write_json(path, obj):
  """Writes JSON atomically: a killed run leaves the old file or the new one."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _check_resumable(workdir, config):
  """Writes config.json, or checks that a resumed run keeps its settings."""
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json())
  if os.path.exists(path):
    try:
      with open(path) as f:
        saved = json.load(f)
    except (OSError, ValueError) as err:
      raise ValueError(
          f"Cannot read {path} ({_short(err)}); it records the settings of "
          "the run in this workdir. Restore it, or use a new workdir.") from err
    changed = [k for k in _FROZEN if saved.get(k) != current.get(k)]
    if changed:
      raise ValueError(
          f"workdir {workdir} holds a run with different settings for "
          f"{changed} (see its config.json); use a new workdir, or the same "
          "config (only the number of steps and logging may change).")
  if jax.process_index() == 0:
    _write_json(path, current)


def _truncate_metrics(path, last_step):
  """Drops lines written after the checkpoint a run resumes from.

  The final evaluation is rerun (and rewritten) by every run, so a line of it
  at the resume step is dropped too: no step is ever logged twice. A line
  that a killed run left half-written is dropped (with a warning).
  """
  if not os.path.exists(path):
    return

  def keep(line):
    try:
      record = json.loads(line)
      step = record["step"]
    except (ValueError, KeyError, TypeError):
      logging.warning("Dropping an unreadable line of %s: %r", path,
                      line[:200])
      return False
    return step < last_step or (step == last_step and _FINAL_KEY not in record)

  with open(path) as f:
    lines = [l if l.endswith("\n") else l + "\n"
             for l in f if l.strip() and keep(l)]
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.writelines(lines)
  os.replace(tmp, path)


class NonFiniteError(FloatingPointError):
  """Training produced a NaN or infinite loss term, gradient or parameter."""


class Interrupted(Exception):
  """Training stopped on SIGTERM or SIGINT after saving a checkpoint.

  Attributes:
    signum: the signal's number (`signal.SIGTERM` or `signal.SIGINT`).
    step: the step of the checkpoint saved before stopping.
  """

  def __init__(self, message: str, *, signum: int, step: int):
    super().__init__(message)
    self.signum = signum
    self.step = step


class _StopRequests:
  """Turns SIGTERM and SIGINT into a request to stop after the current step.

  A step that is running finishes, so its state can be checkpointed; a second
  SIGINT (Ctrl-C) stops at once, with the default behaviour. Handlers are
  installed only from the main thread (Python allows no other) and restored on
  exit. With several processes, a request on any of them stops all of them at
  the same step.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._previous = {}
    self._in_flight = None   # the agreement dispatched by the last call
    self._max = self._sharding = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum is not None:
      signal.signal(signal.SIGINT, self._previous.get(
          signal.SIGINT, signal.default_int_handler))
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning(
        "Received %s: the running step finishes, a checkpoint is saved, then "
        "training stops (rerun the same command to resume). Press Ctrl-C "
        "again to stop at once without saving.", signal.Signals(signum).name)

  def requested(self, *, wait: bool = True) -> Optional[int]:
    """The signal to stop for (agreed by all processes), or None.

    With one process this is the signal received so far. With several, the
    processes agree by a maximum over all devices. `wait=False` is for the
    loop's every step: it dispatches this step's agreement without waiting
    for it and returns the previous call's, which the device has computed
    by then (it was queued after the previous step), so the host does not
    wait for the running step; a signal then takes effect one step later,
    at the same step on every process. `wait=True` agrees now.
    """
    if jax.process_count() == 1:
      return self.signum
    agreed = self._agreement()
    if wait:
      self._in_flight = None
    else:
      agreed, self._in_flight = self._in_flight, agreed
    return None if agreed is None else int(agreed) or None

  def _agreement(self) -> jax.Array:
    """Dispatches the maximum of every process's signal number (0: none)."""
    if self._max is None:
      mesh = Mesh(np.array(jax.devices()), ("processes",))
      self._sharding = NamedSharding(mesh, P("processes"))
      self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
    local = np.full((jax.local_device_count(),), self.signum or 0, np.int32)
    return self._max(jax.make_array_from_process_local_data(
        self._sharding, local))


# --- The loop. ---------------------------------------------------------------


def evaluate(config, apply_fn, params, images, labels, *, parallel=None,
             with_pgd=True) -> dict[str, float]:
  """Natural accuracy (and PGD adversarial accuracy) on a test set.

  Args:
    config: the training config (`eval.*`, `objective.*` for the attack).
    apply_fn: `(params, x) -> logits`.
    params: host parameters.
    images: `[N, *S]` test images.
    labels: `[N]`.
    parallel: the device placement to use (None: from the config).
    with_pgd: also compute the adversarial accuracy on the first
      `eval.pgd_num_examples` examples.

  Returns:
    `{"natural_accuracy", "num_examples"}` plus `"adversarial_accuracy"` and
    `"num_adversarial_examples"` with PGD.

  References:
    RAR spec Sec. 4.1 (NA and AA); Madry et al., "Towards Deep Learning
    Models Resistant to Adversarial Attacks", ICLR 2018.

  Example:
    >>> import numpy as np
    >>> c = default_config()
    >>> c.num_devices, c.eval.batch_size = 1, 4
    >>> c.objective.update(epsilon=0.1, step_size=0.05, num_steps=2)
    >>> apply_fn = lambda p, x: x.reshape(len(x), -1) @ p   # linear, 2 classes
    >>> images = np.zeros((6, 1, 2, 1), np.float32)
    >>> images[:3, 0, 0] = 1.0                              # class 0 wins
    >>> labels = np.array([0, 0, 0, 1, 1, 1])               # ties go to 0
    >>> evaluate(c, apply_fn, np.eye(2, dtype=np.float32), images, labels)
    {'num_examples': 6, 'natural_accuracy': 0.5, 'adversarial_accuracy': 0.5,
     'num_adversarial_examples': 6}
  """
  parallel = parallel or _Parallel(config.parallel, _num_devices(config))
  n = config.eval.num_examples or len(images)
  images, labels = images[:n], labels[:n]
  attack = dict(
      epsilon=config.eval.pgd_epsilon if config.eval.pgd_epsilon is not None
      else config.objective.epsilon,
      step_size=config.eval.pgd_step_size or config.objective.step_size,
      num_steps=config.eval.pgd_num_steps or config.objective.num_steps,
      clip_min=config.objective.clip_min, clip_max=config.objective.clip_max)
  results = {"num_examples": n}
  p_params = parallel.replicate(params)
  for use_pgd in ((False, True) if with_pgd else (False,)):
    # One compiled step per (model, attack) and placement, reused by every
    # periodic evaluation.
    step_fn = parallel.compile_cached(
        ("eval_step", apply_fn,
         tuple(sorted(attack.items())) if use_pgd else None),
        functools.partial(eval_step, apply_fn=apply_fn,
                          attack=attack if use_pgd else None),
        num_replicated=1)
    count = min(n, config.eval.pgd_num_examples or n) if use_pgd else n
    total = {}
    bs = _loop_batch_size(config.eval.batch_size, count, parallel)
    for start in range(0, count, bs):
      x, y, mask = data_lib.pad_batch(
          images[start:start + bs][:count - start],
          labels[start:start + bs][:count - start], batch_size=bs)
      keys = _index_keys(config.seed, np.arange(start, start + bs),
                         _EVAL_PGD_SALT)
      local = [_process_slice(v) for v in (x, y, mask, keys)]
      out = step_fn(p_params, *parallel.shard(local))
      out = parallel.unreplicate(out)
      total = {k: total.get(k, 0.0) + float(v) for k, v in out.items()}
    if use_pgd:
      results["adversarial_accuracy"] = total["adv_correct"] / total["count"]
      results["num_adversarial_examples"] = int(total["count"])
    else:
      results["natural_accuracy"] = total["correct"] / total["count"]
  return results


def check_data(images, labels, config, *, split: str) -> None:
  """Refuses a dataset the config cannot train or evaluate on, before compiling.

  Args:
    images: `[N, H, W, C]` as loaded (float, or `data.ScaledPixels`).
    labels: `[N]`.
    config: the config (`dataset.*`, `objective.clip_min/clip_max`).
    split: the split's name, for the message.

  Raises:
    ValueError: a non-float or non-finite image, pixels outside the declared
      box `[objective.clip_min, objective.clip_max]` (nothing is clipped
      silently: the attacks assume it), or labels outside
      `[0, dataset.num_classes)`; the message names the values found.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (spec
    Sec. 3.2: pixel ranges [0, 1] for MNIST, [0, 255] for GTSRB/Flower).

  Example:
    >>> import numpy as np
    >>> config = default_config()    # pixels in [0, 1], 10 classes
    >>> check_data(np.full((2, 4, 4, 1), 255.0, np.float32), np.array([0, 1]),
    ...            config, split="train")
    Traceback (most recent call last):
    ...
    ValueError: The train split of 'embedded_mnist' has pixels in [255, 255], outside the declared pixel range objective.clip_min=0, objective.clip_max=1; ...
  """
  name = f"The {split} split of {config.dataset.name!r}"
  if isinstance(images, data_lib.ScaledPixels):   # uint8, pixel_max > 0
    found = images.value_range() if len(images) else None
  else:
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f"{name} has images of dtype {images.dtype}; "
                       "accepted: floating point (the loaders convert).")
    finite = np.isfinite(images)
    if not finite.all():
      bad = np.flatnonzero(~finite.reshape(len(images), -1).all(axis=1))
      raise ValueError(
          f"{name} has {bad.size} images with NaN or infinite pixels (the "
          f"first at index {bad[0]}); accepted: finite pixel values.")
    found = (images.min(), images.max()) if len(images) else None
  lo, hi = config.objective.clip_min, config.objective.clip_max
  if found is not None and (found[0] < lo or found[1] > hi):
    raise ValueError(
        f"{name} has pixels in [{found[0]:g}, {found[1]:g}], outside "
        f"the declared pixel range objective.clip_min={lo:g}, "
        f"objective.clip_max={hi:g}; set those to the data's range (e.g. "
        "0 and 255 for raw 8-bit pixels) or rescale the data.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} has labels of dtype {labels.dtype}; accepted: "
                     "integer class indices.")
  if len(labels) and (labels.min() < 0
                      or labels.max() >= config.dataset.num_classes):
    raise ValueError(
        f"{name} has labels in [{labels.min()}, {labels.max()}], outside "
        f"[0, {config.dataset.num_classes}); set dataset.num_classes.")


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains a model as `config` says, resuming from `workdir` if possible.

  SIGTERM or Ctrl-C (SIGINT) lets the running step finish, saves a checkpoint
  and raises `Interrupted`; rerunning resumes from it. After a kill (or a
  crash) the rerun resumes from the last checkpoint saved, falling back to an
  older one if the newest is damaged. Either way the resumed run ends with the
  same parameters as an uninterrupted one (deterministic batches and keys).

  In one process, a run with the model, objective, optimiser and placement
  of one of the last `MAX_CACHED_PROGRAMS` runs reuses their traced and
  compiled steps (a resume, another seed or dataset of the same shapes, a
  notebook loop); `evaluation.evaluate_checkpoint` reuses them too.

  Args:
    config: a `ConfigDict` with the fields of `default_config()`.
    workdir: output folder: `checkpoints/`, `metrics.jsonl`, TensorBoard
      events, `config.json`, `final_metrics.json`.

  Returns:
    The final evaluation metrics (natural and PGD accuracy on the test split,
    the final training step).

  Raises:
    ValueError: a bad config or dataset (before any compilation).
    CheckpointError: no checkpoint in `workdir/checkpoints` can be restored.
    NonFiniteError: a non-finite loss term, gradient or parameter (the last
      good checkpoint stays in `workdir`).
    Interrupted: SIGTERM or SIGINT, after saving a checkpoint.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (spec
    Sec. 3 training, Sec. 4.1 NA/AA).

  Example:
    Seconds on a CPU with the smoke preset; `tests/train_test.py` runs it
    (with a resume).

    >>> from experiments.configs import quickstart  # doctest: +SKIP
    >>> train_and_evaluate(quickstart.get_config("smoke"),
    ...                    "/tmp/rar_smoke")["step"]  # doctest: +SKIP
    4
  """
  # --- Check everything that can be checked before compiling. ---
  validate_config(config)
  num_devices = _num_devices(config)
  # 8-bit training images stay 8-bit in memory; each batch is converted.
  train_x, train_y = data_lib.load_dataset(
      config.dataset.name, config.dataset.train_split,
      data_dir=config.dataset.data_dir, pixel_max=config.dataset.pixel_max,
      keep_integers=True)
  test_x, test_y = data_lib.load_dataset(
      config.dataset.name, config.dataset.test_split,
      data_dir=config.dataset.data_dir, pixel_max=config.dataset.pixel_max)
  check_data(train_x, train_y, config, split=config.dataset.train_split)
  check_data(test_x, test_y, config, split=config.dataset.test_split)
  if len(train_y) < config.batch_size:
    raise ValueError(f"batch_size={config.batch_size} is larger than the "
                     f"training set ({len(train_y)} examples).")
  os.makedirs(workdir, exist_ok=True)
  _check_resumable(workdir, config)
  is_writer = jax.process_index() == 0

  # --- Model, optimiser, state; resume if a checkpoint exists. ---
  programs = _programs(config, num_devices)
  init_fn, apply_fn, tx = programs.init_fn, programs.apply_fn, programs.tx
  parallel = programs.parallel
  # One compiled program (run eagerly, every initializer compiles its own
  # random-number kernel), without LLVM optimisation on CPU: it runs once.
  params = runtime.run_once(init_fn, jax.random.key(config.seed),
                            jnp.asarray(train_x[:1]))
  state = jax.device_get({"params": params, "opt_state": tx.init(params),
                          "step": np.int32(0)})
  restored = _restore(workdir, config, state)
  manager = _checkpoint_manager(workdir, config)
  if restored is not None:
    state = restored
    logging.info("Resumed from %s at step %d.", manager.directory,
                 int(state["step"]))
  start = int(state["step"])
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if is_writer:
    _truncate_metrics(metrics_path, start)
  writer = summary.SummaryWriter(workdir) if is_writer else None
  if writer and start:
    # TensorBoard drops the earlier files' points after `start`.
    writer.session_start(start + 1)

  p_train_step = programs.train_step
  p_state = parallel.replicate(state)

  def write(record):
    if not is_writer:
      return
    with open(metrics_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    writer.scalars({k: v for k, v in record.items() if k != "step"},
                   record["step"])
    writer.flush()

  # --- The loop. ---
  total_steps = config.num_train_steps
  batches = data_lib.batches(train_x, train_y, batch_size=config.batch_size,
                             seed=config.seed, start_step=start)
  window, t0, t_start = {}, time.time(), time.time()
  last_saved = start

  def check(done, sums):
    """Brings a step's sums to the host; refuses non-finite values."""
    sums = parallel.unreplicate(sums)
    bad = [k for k, v in sums.items() if not np.isfinite(v)]
    if sums.pop("nonfinite_params"):
      bad.append("updated parameters")
    if bad:
      where = (f"the last good checkpoint is step {last_saved} in "
               f"{manager.directory}" if last_saved else
               "no checkpoint was saved before it")
      raise NonFiniteError(
          f"Non-finite {', '.join(bad)} at step {done} (objective "
          f"{config.objective.name!r}); {where}. Lower the learning rate "
          "or check the data.")
    for k, v in sums.items():
      window[k] = window.get(k, 0.0) + float(v)
    window["steps"] = window.get("steps", 0) + 1

  def every(n, done):
    return bool(n) and done % n == 0

  try:
    with _StopRequests() as stop:
      # A step's sums are checked while the next step runs (the host does
      # not wait for the device between steps), except at a step that logs,
      # saves, evaluates, ends or stops: that one is checked before the
      # next starts (its state is still there to save). So every saved
      # state has been checked, and a non-finite step is reported by its
      # own number, at most one step later. With several processes, the
      # agreement to stop is read one step late for the same reason.
      pending = None
      step_keys = _StepKeys(config.seed, config.batch_size)
      for step in range(start, total_steps):
        x, y = next(batches)
        keys = step_keys(step)
        local = [_process_slice(v) for v in (x, y, keys)]
        p_state, sums = p_train_step(p_state, *parallel.shard(local))
        done = step + 1
        if pending is not None:
          check(*pending)
          pending = None
        signum = stop.requested(wait=False)
        logs = done == total_steps or every(config.log_every_steps, done)
        saves = every(config.checkpoint_every_steps, done)
        evals = every(config.eval_every_steps, done) and done != total_steps
        if not (signum or logs or saves or evals):
          pending = (done, sums)
          continue
        check(done, sums)
        if logs:
          _log(write, window, done, total_steps, time.time() - t0)
          window, t0 = {}, time.time()
        if saves:
          _save(manager, done, parallel.unreplicate(p_state))
          last_saved = done
        if evals:
          ev = evaluate(config, apply_fn,
                        parallel.unreplicate(p_state)["params"], test_x,
                        test_y, parallel=parallel, with_pgd=False)
          write({"step": done,
                 "eval/natural_accuracy": ev["natural_accuracy"]})
        # A signal that came during this step's logging, saving or evaluation.
        signum = signum or stop.requested()
        if signum and done != total_steps:
          if last_saved != done:
            _save(manager, done, parallel.unreplicate(p_state))
            last_saved = done
          name = signal.Signals(signum).name
          logging.warning("Stopped by %s at step %d; checkpoint saved in %s.",
                          name, done, manager.directory)
          raise Interrupted(
              f"Training stopped by {name} at step {done} of {total_steps}; "
              f"the checkpoint of step {done} is in {manager.directory}. "
              "Rerun the same command to resume.", signum=signum, step=done)
      state = parallel.unreplicate(p_state)
      if last_saved != int(state["step"]):
        _save(manager, int(state["step"]), state)

    # --- Final evaluation (signals act as usual again: all is saved). ---
    final = evaluate(config, apply_fn, state["params"], test_x, test_y,
                     parallel=parallel)
    final["step"] = int(state["step"])
    final["train_seconds"] = time.time() - t_start
    write({"step": final["step"],
           "eval/natural_accuracy": final["natural_accuracy"],
           _FINAL_KEY: final["adversarial_accuracy"]})
  finally:
    manager.close()
    if writer:
      writer.close()
  if is_writer:
    _write_json(os.path.join(workdir, "final_metrics.json"), final)
  logging.info("Final: %s", final)
  return final


def _log(write, window, done, total_steps, elapsed):
  """Writes the averages of a logging window and prints the progress line."""
  steps_per_sec = window["steps"] / max(elapsed, 1e-9)
  count = window["count"]
  record = {"step": done}
  record.update({f"train/{k}": window[k] / count for k in (
      "loss", "ce", "adv_ce", "reg", "accuracy", "adv_accuracy")})
  record["train/grad_norm"] = window["grad_norm"] / window["steps"]
  record["steps_per_sec"] = steps_per_sec
  record["examples_per_sec"] = count / max(elapsed, 1e-9)
  write(record)
  eta = (total_steps - done) / max(steps_per_sec, 1e-9)
  logging.info(
      "step %d/%d  loss %.4f  ce %.4f  adv_ce %.4f  reg %.4f  acc %.3f "
      " adv_acc %.3f  %.2f steps/s  %.1f examples/s  ETA %s", done,
      total_steps, record["train/loss"], record["train/ce"],
      record["train/adv_ce"], record["train/reg"], record["train/accuracy"],
      record["train/adv_accuracy"], steps_per_sec, record["examples_per_sec"],
      time.strftime("%H:%M:%S", time.gmtime(eta)))


__all__ = [
    "AXIS", "default_config", "objective_hyper", "create_optimizer",
    "learning_rate_schedule", "validate_config", "train_step", "eval_step",
    "evaluate", "train_and_evaluate", "latest_checkpoint", "check_data",
    "saved_steps", "NonFiniteError", "Interrupted", "CheckpointError",
]

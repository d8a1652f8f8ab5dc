"""Evaluation of a trained model: the numbers and figures of Table 1.

`evaluate_checkpoint(config, workdir)` restores a training run's latest
checkpoint and measures, on the test split (spec section 4):

* NA and AA: natural accuracy and accuracy under the PGD attack of training
  (`train.evaluate`; `eval.pgd_*` override the attack, `eval.pgd_num_restarts`
  adds random restarts for a tighter bound);
* IN, CO and Spearman's rho: the top-k attribution attack (`attack.*`,
  `attribution_attack`) on every correctly classified example of the first
  `attack.num_examples`, averaged over those examples (sums and a count,
  divided once).

It writes `results.json`, the table row `results.md` / `results.csv`
(Dataset | Method | NA | AA | IN | CO), `per_example.npz`, and the figures
`figure_saliency.png` (image, IG map, attacked image, its IG map: the paper's
Figure 1) and `figure_kendall_hist.png`, with the first figure's data
`figure_examples.npz` (for `experiments/combine.py`), into the workdir or
`output_dir`.

  from experiments.configs import quickstart
  results = evaluate_checkpoint(quickstart.get_config(), "/tmp/rar_quickstart")
  results["topk_intersection"], results["kendall_tau"]

The attack is batched `attack.batch_size` examples at a time and sharded over
the devices with the trainer's placement (`config.parallel`: pmap or
shard_map); each example has its own PRNG key (used by random restarts only),
so results do not depend on the batch size or the number of devices.

References:
  Chen, Wu, Rastogi, Liang, Jha, "Robust Attribution Regularization",
  NeurIPS 2019 (evaluation protocol, spec section 4); Ghorbani, Abid, Zou,
  "Interpretation of Neural Networks is Fragile", AAAI 2019 (the attack).
"""

import csv
import functools
import json
import math
import os
import time
from typing import Any, Optional, Sequence

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from rar_jax import data as data_lib
from rar_jax import metrics as metrics_lib
from rar_jax import models
from rar_jax import objectives
from rar_jax import train
from rar_jax.attacks import attribution_attack
from rar_jax.attacks import pgd
from rar_jax.attacks import SALIENCIES

# The per-example attribution metrics, averaged over the attacked examples.
METRICS = ("topk_intersection", "kendall_tau", "spearman_rho")
TABLE_COLUMNS = ("Dataset", "Method", "NA", "AA", "IN", "CO")
# Display names of the paper's table.
_DATASET_LABELS = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST",
                   "embedded_mnist": "MNIST (sample)", "gtsrb": "GTSRB",
                   "flower17": "Flower", "flower": "Flower",
                   "oxford_flowers102": "Flowers-102"}
_METHOD_LABELS = {"natural": "NATURAL", "madry": "Madry", "trades": "TRADES",
                  "ig_norm": "IG-NORM", "ig_sum_norm": "IG-SUM-NORM",
                  "ig_wasserstein": "IG-Wasserstein"}
# Attack outputs kept per example (the rest serve the figures).
_PER_EXAMPLE = METRICS + ("mass_center_shift", "attacked", "found")
_FIGURE = ("adv_inputs", "clean_saliency", "adv_saliency")
_KEY_SALT = 2   # train uses 0 (training PGD) and 1 (`train._EVAL_PGD_SALT`)


# The trainer's device placement, shared on purpose: one place for parallelism.
_Parallel = train._Parallel  # pylint: disable=protected-access
_index_keys = train._index_keys  # pylint: disable=protected-access
_EVAL_PGD_SALT = train._EVAL_PGD_SALT  # pylint: disable=protected-access
_loop_batch_size = train._loop_batch_size  # pylint: disable=protected-access
_num_devices = train._num_devices  # pylint: disable=protected-access
_process_slice = train._process_slice  # pylint: disable=protected-access


CheckpointError = train.CheckpointError
_drop_closed_loop_noise = train._drop_closed_loop_noise  # pylint: disable=protected-access


def restore_params(workdir: str, *, step: Optional[int] = None):
  """`(step, params)` of a training run's latest (or given) checkpoint.

  Like `train.latest_checkpoint`, with the errors a user can act on.

  Args:
    workdir: a training workdir (reads `workdir/checkpoints/STEP`).
    step: a saved step, or None for the latest.

  Returns:
    `(step, params)`, params as nested dicts of numpy arrays.

  Raises:
    FileNotFoundError: no workdir, no checkpoint in it, or not that step.
    CheckpointError: the checkpoint's files are corrupt or incomplete (the
      message names the step folder and the other saved steps).

  References:
    Orbax, `orbax.checkpoint.CheckpointManager`.

  Example:
    >>> import tempfile
    >>> restore_params(tempfile.mkdtemp())
    Traceback (most recent call last):
      ...
    FileNotFoundError: No checkpoint in workdir ...: .../checkpoints does not
    exist. Train first (experiments/train.py --workdir=...), or check --workdir.
    >>> step, params = restore_params("/tmp/rar_quickstart")  # doctest: +SKIP
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  steps = train.saved_steps(directory)
  if not steps:
    where = (f"{directory} holds no saved step" if os.path.isdir(directory)
             else f"{directory} does not exist")
    raise FileNotFoundError(
        f"No checkpoint in workdir {workdir}: {where}. Train first "
        f"(experiments/train.py --workdir={workdir}), or check --workdir.")
  if step is not None and step not in steps:
    raise FileNotFoundError(f"No checkpoint at step {step} in {directory}; "
                            f"saved steps: {steps}.")
  step = steps[-1] if step is None else step
  try:
    return train.latest_checkpoint(workdir, step)
  except Exception as err:  # pylint: disable=broad-except
    # Orbax and tensorstore raise ValueError, OSError, JSONDecodeError and
    # others for damaged files: one error that names the folder instead.
    _drop_closed_loop_noise()
    others = [s for s in steps if s != step]
    hint = (f"other saved steps: {others} (evaluate one with --step=STEP)"
            if others else "no other step is saved; retrain")
    raise CheckpointError(
        f"Cannot restore the checkpoint {os.path.join(directory, str(step))}"
        f": it is corrupt or incomplete ({train._short(err)}); "  # pylint: disable=protected-access
        f"{hint}.") from err


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(
      np.shape(leaf)) for path, leaf in leaves}


def check_params(params, config, image_shape: Sequence[int], *,
                 source: str = "the checkpoint") -> None:
  """Refuses parameters that do not fit the config's model on its images.

  Args:
    params: restored parameters (nested dicts of arrays).
    config: the config (`model.*`, `dataset.*`).
    image_shape: `(H, W, C)` of the dataset's images.
    source: what the parameters are, for the message (e.g. a path).

  Raises:
    CheckpointError: other parameter names or shapes than
      `jax.eval_shape` of the model's init on `[1, H, W, C]`; the message
      names both shapes of each difference.

  References:
    RAR spec Sec. 5 (each dataset's image shape and model).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> c = train.default_config()
    >>> c.model.name = "tiny_cnn"
    >>> init_fn, _, _ = models.make_apply_fns("tiny_cnn", num_classes=10)
    >>> from rar_jax import runtime
    >>> params = runtime.run_once(init_fn, jax.random.key(0),
    ...                           jnp.zeros((1, 28, 28, 1)))
    >>> check_params(params, c, (28, 28, 1))          # fits: no error
    >>> check_params(params, c, (32, 32, 3))
    Traceback (most recent call last):
      ...
    rar_jax.train.CheckpointError: the checkpoint does not fit the
    config: model 'tiny_cnn' with 10 classes on 'embedded_mnist' images of
    shape (32, 32, 3) has 2,278 parameters, the checkpoint 1,762; ...
  """
  init_fn, _, _ = models.make_apply_fns(
      config.model.name, num_classes=config.dataset.num_classes,
      activation=config.model.activation)
  expected = _shapes(jax.eval_shape(
      init_fn, jax.random.key(0),
      jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)))
  got = _shapes(params)
  if got == expected:
    return
  differences = [f"{k}: {source} {got[k]} vs config {expected[k]}"
                 for k in expected if k in got and got[k] != expected[k]]
  missing = [k for k in expected if k not in got]
  unexpected = [k for k in got if k not in expected]
  if missing:
    differences.append(f"missing in {source}: {missing[:6]}"
                       + (" ..." if len(missing) > 6 else ""))
  if unexpected:
    differences.append(f"not in the config's model: {unexpected[:6]}"
                       + (" ..." if len(unexpected) > 6 else ""))
  count = lambda shapes: sum(math.prod(s) for s in shapes.values())
  raise CheckpointError(
      f"{source} does not fit the config: model {config.model.name!r} with "
      f"{config.dataset.num_classes} classes on {config.dataset.name!r} "
      f"images of shape {tuple(image_shape)} has {count(expected):,} "
      f"parameters, {source} {count(got):,}; "
      + "; ".join(differences[:8])
      + ". Evaluate with the config the model was trained with (a copy is "
      "the workdir's config.json).")


# --- Settings from the config. ------------------------------------------------


def attack_settings(config) -> dict[str, Any]:
  """Keyword arguments of `attribution_attack` from `config.attack`.

  `attack.epsilon` None takes the training radius `objective.epsilon`; the
  pixel box is `objective.clip_min/clip_max`.

  Args:
    config: the config (`attack.*`, `objective.*`).

  Returns:
    A dict of `attribution_attack`'s keyword arguments (all but the key and
    the surrogate network).

  References:
    RAR spec Sec. 4.2 (the attack's settings per dataset).

  Example:
    >>> s = attack_settings(train.default_config())
    >>> s["epsilon"], s["k_top"], s["eval_k"], s["num_steps"], s["num_ig_steps"]
    (0.3, 200, 100, 100, 100)
  """
  a = config.attack
  return dict(
      epsilon=a.epsilon if a.epsilon is not None else config.objective.epsilon,
      step_size=a.step_size, num_steps=a.num_steps, k_top=a.k_top,
      eval_k=a.eval_k, saliency=a.saliency, num_ig_steps=a.num_ig_steps,
      num_restarts=a.num_restarts, clip_min=config.objective.clip_min,
      clip_max=config.objective.clip_max, quantize=a.quantize,
      chunk_size="auto" if a.ig_chunk_size is None else a.ig_chunk_size)


def _check_int(name, value, minimum, allow_none=False):
  if allow_none and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(
        f"{name}={value!r} is not accepted; it must be an int >= {minimum}"
        + (" or None" if allow_none else "") + ".")


def validate_eval_config(config) -> None:
  """Checks the evaluation's own fields (`attack.*`, restarts) early.

  The attack's hyper-parameters are checked again, against the image shape,
  when `evaluate_checkpoint` traces the attack before running anything.

  Args:
    config: the config (`attack.*`, `eval.pgd_num_restarts`).

  Raises:
    ValueError: the first bad field, named with its value.

  References:
    RAR spec Sec. 4.2 (the attack's settings).

  Example:
    >>> c = train.default_config()
    >>> c.attack.saliency = "smooth"
    >>> validate_eval_config(c)
    Traceback (most recent call last):
      ...
    ValueError: Unknown attack.saliency 'smooth'; accepted: ig, gradient.
  """
  a = config.attack
  if a.saliency not in SALIENCIES:
    raise ValueError(f"Unknown attack.saliency {a.saliency!r}; accepted: "
                     f"{', '.join(SALIENCIES)}.")
  _check_int("attack.batch_size", a.batch_size, 1)
  _check_int("attack.num_examples", a.num_examples, 1, allow_none=True)
  _check_int("attack.num_figure_examples", a.num_figure_examples, 0)
  _check_int("eval.pgd_num_restarts", config.eval.pgd_num_restarts, 1)
  train.check_divisible("attack.batch_size", a.batch_size, config)


def _overridden(config, *, num_examples=None, saliency=None, seed=None):
  config = config.copy_and_resolve_references()
  if num_examples is not None:
    _check_int("num_examples", num_examples, 1)
    config.eval.num_examples = num_examples
    config.eval.pgd_num_examples = num_examples
    config.attack.num_examples = num_examples
  if saliency is not None:
    config.attack.saliency = saliency
  if seed is not None:
    config.seed = seed
  return config


def dataset_label(config) -> str:
  """The paper's name of the config's dataset ("MNIST", "GTSRB", ...).

  Args:
    config: the config (`dataset.name`; a path's last folder for `npz:`,
      `idx:`, `folder:` and `tfds:` names).

  Returns:
    The Dataset column of the table (the name itself when unknown).

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (Table 1).

  Example:
    >>> c = train.default_config()
    >>> c.dataset.name = "npz:/data/gtsrb"
    >>> dataset_label(c)
    'GTSRB'
  """
  name = config.dataset.name
  for prefix in ("npz:", "idx:", "folder:", "tfds:"):
    if name.startswith(prefix):
      name = os.path.basename(os.path.normpath(name[len(prefix):]))
  return _DATASET_LABELS.get(name, name)


def method_label(config) -> str:
  """The paper's name of the config's objective ("IG-NORM", ...).

  Args:
    config: the config (`objective.name`).

  Returns:
    The Method column of the table (the name itself when unknown).

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (Table 1).

  Example:
    >>> c = train.default_config()
    >>> c.objective.name = "ig_sum_norm"
    >>> method_label(c)
    'IG-SUM-NORM'
  """
  name = config.objective.name
  return _METHOD_LABELS.get(name, name)


# --- The per-device steps: collectives over train.AXIS only. -----------------


def attack_step(params, inputs, labels, keys, *, apply_fn, surrogate_apply_fn,
                settings):
  """The top-k attribution attack on this device's examples.

  Args:
    params: replicated parameters.
    inputs: `[B_d, H, W, C]`.
    labels: `[B_d]`.
    keys: `[B_d, 2]` uint32 PRNG key data, one key per example.
    apply_fn: `(params, x) -> logits`, the ReLU network.
    surrogate_apply_fn: its smooth surrogate (the attack direction).
    settings: `attack_settings(config)`.

  Returns:
    The per-example outputs of `attribution_attack` (`_PER_EXAMPLE`,
    `_FIGURE`), `[B, ...]` for the global batch B, in batch order, on every
    device.

  References:
    Ghorbani, Abid, Zou, "Interpretation of Neural Networks is Fragile",
    AAAI 2019; RAR spec Sec. 4.2.

  Example:
    >>> import functools, jax, numpy as np
    >>> apply_fn = lambda p, x: x.reshape(len(x), -1) @ p   # linear, 2 classes
    >>> settings = dict(epsilon=0.1, step_size=0.05, num_steps=2, k_top=2,
    ...                 eval_k=2, num_ig_steps=4)
    >>> p_attack = jax.pmap(functools.partial(
    ...     attack_step, apply_fn=apply_fn, surrogate_apply_fn=apply_fn,
    ...     settings=settings), axis_name=train.AXIS,
    ...     devices=jax.local_devices()[:1])               # one device
    >>> rng = np.random.default_rng(0)
    >>> x = rng.uniform(size=(1, 3, 2, 2, 1)).astype(np.float32)  # [1, B, ...]
    >>> w = rng.normal(size=(1, 4, 2)).astype(np.float32)
    >>> out = p_attack(w, x, np.zeros((1, 3), np.int32),
    ...                np.zeros((1, 3, 2), np.uint32))
    >>> out["kendall_tau"].shape, out["adv_saliency"].shape
    ((1, 3), (1, 3, 2, 2))
  """
  def one(x, y, key):
    out = attribution_attack(
        apply_fn, params, x[None], y[None],
        surrogate_apply_fn=surrogate_apply_fn,
        key=jax.random.wrap_key_data(key), **settings)
    return {k: out[k][0] for k in _PER_EXAMPLE + _FIGURE}

  # One example at a time under vmap: restarts of an example get its own key.
  out = jax.vmap(one)(inputs, labels, keys)
  # Gathered over the devices (the axis of `jax.pmap` / `jax.shard_map` in
  # `train._Parallel.compile`): replicated outputs, as that expects.
  return jax.tree.map(
      lambda v: lax.all_gather(v, train.AXIS, tiled=True, to="invarying"), out)


def pgd_restarts_step(params, inputs, labels, mask, keys, *, apply_fn, attack,
                      num_restarts):
  """Examples still correct after PGD from each of `num_restarts` starts.

  Restart 0 uses `keys` itself, so that `num_restarts=1` is the attack of
  `train.eval_step`; restart r > 0 folds r into each example's key.

  Args:
    params: replicated parameters.
    inputs: `[B_d, *S]`.
    labels: `[B_d]`.
    mask: `[B_d]` 1 for real examples, 0 for padding.
    keys: `[B_d, 2]` uint32 PRNG key data.
    apply_fn: `(params, x) -> logits`.
    attack: keyword arguments of `pgd`.
    num_restarts: PGD runs per example (>= 1).

  Returns:
    `{"adv_correct", "count"}`, summed over the devices.

  References:
    Madry et al., "Towards Deep Learning Models Resistant to Adversarial
    Attacks", ICLR 2018 (PGD with random restarts); RAR spec Sec. 4.1.

  Example:
    >>> import functools, jax, numpy as np
    >>> apply_fn = lambda p, x: x.reshape(len(x), -1) @ p   # linear, 2 classes
    >>> p_step = jax.pmap(functools.partial(
    ...     pgd_restarts_step, apply_fn=apply_fn, num_restarts=3,
    ...     attack=dict(epsilon=0.1, step_size=0.05, num_steps=2)),
    ...     axis_name=train.AXIS, devices=jax.local_devices()[:1])
    >>> x = np.zeros((1, 2, 1, 2, 1), np.float32)
    >>> x[0, 0, 0, 0] = 1.0         # margin 1: robust; the other: a tie
    >>> out = p_step(np.eye(2, dtype=np.float32)[None], x,
    ...              np.zeros((1, 2), np.int32), np.ones((1, 2), np.float32),
    ...              np.zeros((1, 2, 2), np.uint32))
    >>> float(out["adv_correct"][0]), float(out["count"][0])
    (1.0, 2.0)
  """
  keys = jax.random.wrap_key_data(keys)
  ce = lambda x: objectives.cross_entropy(apply_fn(params, x), labels)

  def correct_after(restart_keys):
    adv = pgd(ce, inputs, key=restart_keys, **attack)
    return metrics_lib.accuracy(apply_fn(params, adv), labels)

  def body(r, robust):
    restart_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, r)
    return robust * correct_after(restart_keys)

  robust = lax.fori_loop(1, num_restarts, body, correct_after(keys))
  return lax.psum({"adv_correct": jnp.sum(mask * robust),
                   "count": jnp.sum(mask)}, train.AXIS)


# --- Host loops. --------------------------------------------------------------


def _pgd_attack_kwargs(config):
  e = config.eval
  return dict(
      epsilon=e.pgd_epsilon if e.pgd_epsilon is not None
      else config.objective.epsilon,
      step_size=e.pgd_step_size or config.objective.step_size,
      num_steps=e.pgd_num_steps or config.objective.num_steps,
      clip_min=config.objective.clip_min, clip_max=config.objective.clip_max)


def accuracies(config, apply_fn, params, images, labels, *,
               parallel=None) -> dict[str, Any]:
  """NA on the first `eval.num_examples`, AA on `eval.pgd_num_examples`.

  `train.evaluate`; with `eval.pgd_num_restarts > 1`, an example counts as
  robust only if it is classified correctly after every restart.

  Args:
    config: the config.
    apply_fn: `(params, x) -> logits`.
    params: host parameters.
    images: `[N, *S]` test images.
    labels: `[N]`.
    parallel: a `train._Parallel` (None: from the config).

  Returns:
    `{"natural_accuracy", "num_examples", "adversarial_accuracy",
    "num_adversarial_examples"}`.

  References:
    RAR spec Sec. 4.1 (NA and AA); Madry et al., "Towards Deep Learning
    Models Resistant to Adversarial Attacks", ICLR 2018.

  Example:
    >>> import numpy as np
    >>> c = train.default_config()
    >>> c.num_devices, c.eval.batch_size, c.eval.pgd_num_restarts = 1, 4, 2
    >>> c.objective.update(epsilon=0.1, step_size=0.05, num_steps=2)
    >>> apply_fn = lambda p, x: x.reshape(len(x), -1) @ p   # linear, 2 classes
    >>> images = np.zeros((6, 1, 2, 1), np.float32)
    >>> images[:3, 0, 0] = 1.0                              # class 0, margin 1
    >>> accuracies(c, apply_fn, np.eye(2, dtype=np.float32), images,
    ...            np.zeros(6, np.int32))
    {'num_examples': 6, 'natural_accuracy': 1.0, 'adversarial_accuracy': 0.5,
     'num_adversarial_examples': 6}
  """
  restarts = config.eval.pgd_num_restarts
  results = train.evaluate(config, apply_fn, params, images, labels,
                           parallel=parallel, with_pgd=restarts == 1)
  if restarts == 1:
    return results
  parallel = parallel or _Parallel(config.parallel, _num_devices(config))
  attack = _pgd_attack_kwargs(config)
  step_fn = parallel.compile_cached(
      ("pgd_restarts_step", apply_fn, tuple(sorted(attack.items())),
       restarts),
      functools.partial(pgd_restarts_step, apply_fn=apply_fn, attack=attack,
                        num_restarts=restarts), num_replicated=1)
  p_params = parallel.replicate(params)
  n = config.eval.num_examples or len(images)
  count = min(n, config.eval.pgd_num_examples or n)
  bs, total = _loop_batch_size(config.eval.batch_size, count, parallel), {}
  for start in range(0, count, bs):
    x, y, mask = data_lib.pad_batch(images[start:min(start + bs, count)],
                                    labels[start:min(start + bs, count)],
                                    batch_size=bs)
    # The keys of `train.evaluate`: restart 0 is its attack.
    keys = _index_keys(config.seed, np.arange(start, start + bs),
                       _EVAL_PGD_SALT)
    local = [_process_slice(v) for v in (x, y, mask, keys)]
    out = parallel.unreplicate(step_fn(p_params, *parallel.shard(local)))
    total = {k: total.get(k, 0.0) + float(v) for k, v in out.items()}
  results["adversarial_accuracy"] = total["adv_correct"] / total["count"]
  results["num_adversarial_examples"] = int(total["count"])
  return results


def _per_example_keys(seed: int, indices: np.ndarray) -> np.ndarray:
  """`[B, 2]` uint32 key data: one key per test example, from its index."""
  return _index_keys(seed, indices, _KEY_SALT)


def attribution_robustness(config, apply_fn, surrogate_apply_fn, params,
                           images, labels, *, parallel=None):
  """The top-k attribution attack on the first `attack.num_examples` images.

  Args:
    config: the config (`attack.*`, `seed`, `parallel`).
    apply_fn: `(params, x) -> logits`, the ReLU network.
    surrogate_apply_fn: its smooth surrogate.
    params: host parameters.
    images: `[N, H, W, C]` test images, in test order.
    labels: `[N]`.
    parallel: a `train._Parallel` (None: from the config).

  Returns:
    `(per_example, figure_examples)`. `per_example`: numpy arrays `[n]` for
    the n examples scanned: `index`, `label`, `correct` (bool: attacked and
    averaged), `topk_intersection`, `kendall_tau`, `spearman_rho`,
    `mass_center_shift` (NaN where not correct) and `found` (an admissible
    iterate lowered tau). `figure_examples`: the same for the first
    `attack.num_figure_examples` correct examples plus `image`, `adv_image`
    `[k, H, W, C]`, `saliency`, `adv_saliency` `[k, H, W]`.

  References:
    Ghorbani, Abid, Zou, "Interpretation of Neural Networks is Fragile",
    AAAI 2019; RAR spec Sec. 4.2 (the protocol).

  Example:
    >>> import numpy as np
    >>> c = train.default_config()
    >>> c.num_devices = 1
    >>> c.attack.update(k_top=2, eval_k=2, num_steps=2, step_size=0.05,
    ...                 epsilon=0.1, num_ig_steps=4, batch_size=2)
    >>> apply_fn = lambda p, x: x.reshape(len(x), -1) @ p   # linear, 2 classes
    >>> rng = np.random.default_rng(0)
    >>> images = rng.uniform(size=(3, 2, 2, 1)).astype(np.float32)
    >>> w = rng.normal(size=(4, 2)).astype(np.float32)
    >>> labels = np.argmax(images.reshape(3, 4) @ w, axis=-1)   # all correct
    >>> per_example, figures = attribution_robustness(
    ...     c, apply_fn, apply_fn, w, images, labels)
    >>> per_example["correct"], per_example["kendall_tau"].shape
    (array([ True,  True,  True]), (3,))
    >>> figures["adv_saliency"].shape                  # num_figure_examples
    (3, 2, 2)
  """
  parallel = parallel or _Parallel(config.parallel, _num_devices(config))
  settings = attack_settings(config)
  step_fn = parallel.compile_cached(
      ("attack_step", apply_fn, surrogate_apply_fn,
       tuple(sorted(settings.items()))),
      functools.partial(attack_step, apply_fn=apply_fn,
                        surrogate_apply_fn=surrogate_apply_fn,
                        settings=settings), num_replicated=1)
  p_params = parallel.replicate(params)
  n = min(config.attack.num_examples or len(images), len(images))
  bs = _loop_batch_size(config.attack.batch_size, n, parallel)
  num_figures = config.attack.num_figure_examples
  columns = {k: [] for k in _PER_EXAMPLE}
  figures = {k: [] for k in ("index", "label", "image") + _PER_EXAMPLE
             + _FIGURE}
  t_start = time.time()
  t_first = first_done = None
  for start in range(0, n, bs):
    stop = min(start + bs, n)
    x, y, _ = data_lib.pad_batch(images[start:stop], labels[start:stop],
                                 batch_size=bs)
    keys = _per_example_keys(config.seed, np.arange(start, start + bs))
    local = [_process_slice(v) for v in (x, y, keys)]
    out = parallel.unreplicate(step_fn(p_params, *parallel.shard(local)))
    out = {k: np.asarray(v)[:stop - start] for k, v in out.items()}
    for k in _PER_EXAMPLE:
      columns[k].append(out[k])
    for i in np.flatnonzero(out["attacked"]):
      if len(figures["index"]) >= num_figures:
        break
      figures["index"].append(start + i)
      figures["label"].append(labels[start + i])
      figures["image"].append(images[start + i])
      for k in _PER_EXAMPLE + _FIGURE:
        figures[k].append(out[k][i])
    # Progress: the rate leaves out the first batch, which compiles.
    now = time.time()
    if t_first is None:
      t_first, first_done = now, stop
      rate_text = f"first batch (with compilation) in {now - t_start:.1f} s"
      eta_text = ""
    else:
      rate = (stop - first_done) / max(now - t_first, 1e-9)
      rate_text = f"{rate:.1f} examples/s"
      eta_text = "  ETA " + time.strftime(
          "%H:%M:%S", time.gmtime((n - stop) / max(rate, 1e-9)))
    logging.info("attribution attack: %d/%d examples (%d correctly "
                 "classified, attacked)  %s%s", stop, n,
                 sum(int(c.sum()) for c in columns["attacked"]), rate_text,
                 eta_text)
  per_example = {k: np.concatenate(v) if v else np.zeros((0,))
                 for k, v in columns.items()}
  per_example["correct"] = per_example.pop("attacked").astype(bool)
  per_example["found"] = per_example["found"].astype(bool)
  per_example["index"] = np.arange(n)
  per_example["label"] = np.asarray(labels[:n])
  figure_examples = {k: np.asarray(v) for k, v in figures.items()}
  figure_examples["adv_image"] = figure_examples.pop("adv_inputs")
  figure_examples["saliency"] = figure_examples.pop("clean_saliency")
  return per_example, figure_examples


def summarize(per_example) -> dict[str, Any]:
  """Means over the correctly classified examples (spec 4.2 step 8).

  Sums and a count, divided once. An example whose clean saliency map is
  constant (e.g. all zero) has NaN metrics and makes the mean NaN, reported
  as None.

  Args:
    per_example: the first output of `attribution_robustness`.

  Returns:
    `topk_intersection`, `kendall_tau`, `spearman_rho` (None when no example
    is correct), `num_examples_scanned`, `num_examples_attacked`,
    `num_attacks_found`.

  References:
    RAR spec Sec. 4.2 (averages over the correctly classified examples).

  Example:
    >>> import numpy as np
    >>> summarize(dict(
    ...     correct=np.array([True, True, False]),
    ...     found=np.array([True, False, False]),
    ...     topk_intersection=np.array([0.5, 1.0, np.nan]),
    ...     kendall_tau=np.array([0.25, 1.0, np.nan]),
    ...     spearman_rho=np.array([0.5, 1.0, np.nan])))
    {'num_examples_scanned': 3, 'num_examples_attacked': 2,
     'num_attacks_found': 1, 'topk_intersection': 0.75,
     'kendall_tau': 0.625, 'spearman_rho': 0.75}
  """
  correct = per_example["correct"]
  count = int(correct.sum())
  out = {"num_examples_scanned": int(len(correct)),
         "num_examples_attacked": count,
         "num_attacks_found": int(per_example["found"].sum())}
  for k in METRICS:
    total = float(np.sum(per_example[k][correct], dtype=np.float64))
    out[k] = total / count if count and math.isfinite(total) else None
  return out


# --- Tables and figures. ------------------------------------------------------


def _percent(value):
  return "–" if value is None else f"{100 * value:.2f}%"


def table_row(results) -> list[str]:
  """`results.json` contents -> the row `Dataset | Method | NA | AA | IN | CO`.

  NA, AA and IN in percent with 2 decimals, CO (Kendall's tau) with 4; a
  simple-gradient evaluation is marked in the Method column.

  Args:
    results: a dict with `dataset`, `method` and (each may be None or
      missing) `natural_accuracy`, `adversarial_accuracy`,
      `topk_intersection`, `kendall_tau` as fractions, `saliency`.

  Returns:
    The six cells, strings ("–" for a missing value).

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (Table 1).

  Example:
    >>> table_row(dict(dataset="MNIST", method="IG-NORM",
    ...                natural_accuracy=0.95, adversarial_accuracy=0.792,
    ...                topk_intersection=0.8935, kendall_tau=0.5072))
    ['MNIST', 'IG-NORM', '95.00%', '79.20%', '89.35%', '0.5072']
  """
  method = results["method"]
  if results.get("saliency", "ig") != "ig":
    method += f" ({results['saliency']} saliency)"
  co = results.get("kendall_tau")
  return [results["dataset"], method,
          _percent(results.get("natural_accuracy")),
          _percent(results.get("adversarial_accuracy")),
          _percent(results.get("topk_intersection")),
          "–" if co is None else f"{co:.4f}"]


def write_table(results_list: Sequence[dict], prefix: str) -> list[str]:
  """Writes `prefix.md` and `prefix.csv`, one row per results dict.

  The CSV holds the same values, percentages without the % sign and empty
  cells for missing values.

  Args:
    results_list: dicts as `table_row` takes (e.g. `results.json`
      contents).
    prefix: path without the extension (folders are created).

  Returns:
    The two paths.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (Table 1).

  Example:
    >>> import os, tempfile
    >>> md, csv_path = write_table(
    ...     [dict(dataset="MNIST", method="NATURAL", natural_accuracy=0.99)],
    ...     os.path.join(tempfile.mkdtemp(), "table"))
    >>> print(open(md).read(), end="")
    | Dataset | Method | NA | AA | IN | CO |
    |---|---|---:|---:|---:|---:|
    | MNIST | NATURAL | 99.00% | – | – | – |
    >>> print(open(csv_path).read(), end="")
    Dataset,Method,NA,AA,IN,CO
    MNIST,NATURAL,99.00,,,
  """
  rows = [table_row(r) for r in results_list]
  md = ["| " + " | ".join(TABLE_COLUMNS) + " |",
        "|---|---|---:|---:|---:|---:|"]
  md += ["| " + " | ".join(row) + " |" for row in rows]
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  with open(prefix + ".md", "w") as f:
    f.write("\n".join(md) + "\n")
  with open(prefix + ".csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(TABLE_COLUMNS)
    for row in rows:
      writer.writerow([c.rstrip("%").replace("–", "") for c in row])
  return [prefix + ".md", prefix + ".csv"]


def _figure(width, height):
  # A Figure with an Agg canvas: no pyplot, no global backend to switch.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _show_image(ax, image, pixel_max):
  image = np.clip(np.asarray(image, np.float32) / pixel_max, 0.0, 1.0)
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
  else:
    ax.imshow(image)


def plot_saliency(examples, path: str, *, title: str, saliency: str = "ig",
                  epsilon: float = 0.0, eval_k: int = 0,
                  pixel_max: float = 1.0) -> None:
  """The paper's Figure 1: image | map | attacked image | map, per row.

  Both maps of a row share one colour scale.

  Args:
    examples: the second output of `attribution_robustness`.
    path: the PNG to write.
    title: the figure's title.
    saliency: "ig" or "gradient" (for the labels).
    epsilon: the attack radius (for the labels).
    eval_k: k of the intersection (for the labels).
    pixel_max: the upper end of the pixel range (to display images).

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019
    (Figure 1).

  Example:
    >>> import os, tempfile, numpy as np
    >>> examples = dict(
    ...     index=[0], label=[7], image=np.zeros((1, 28, 28, 1)),
    ...     adv_image=np.zeros((1, 28, 28, 1)), found=[True],
    ...     saliency=np.ones((1, 28, 28)), adv_saliency=np.ones((1, 28, 28)),
    ...     topk_intersection=[1.0], kendall_tau=[1.0])
    >>> path = os.path.join(tempfile.mkdtemp(), "figure_saliency.png")
    >>> plot_saliency(examples, path, title="example", epsilon=0.3, eval_k=100)
    >>> os.path.getsize(path) > 0
    True
  """
  rows = len(examples["index"])
  name = "IG" if saliency == "ig" else "gradient"
  fig = _figure(10.0, 2.6 * max(rows, 1) + 0.6)
  fig.suptitle(title)
  if not rows:
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, "No correctly classified example to attack.",
            ha="center", va="center")
  else:
    axes = fig.subplots(rows, 4, squeeze=False)
    for r in range(rows):
      maps = (examples["saliency"][r], examples["adv_saliency"][r])
      vmax = max(float(np.max(m)) for m in maps) or 1.0
      _show_image(axes[r, 0], examples["image"][r], pixel_max)
      axes[r, 0].set_title(f"test #{examples['index'][r]}, label "
                           f"{examples['label'][r]}", fontsize=9)
      axes[r, 1].imshow(maps[0], cmap="inferno", vmin=0.0, vmax=vmax)
      axes[r, 1].set_title(f"{name} map", fontsize=9)
      _show_image(axes[r, 2], examples["adv_image"][r], pixel_max)
      axes[r, 2].set_title(
          f"attacked (ε = {epsilon:g}), same label" if examples["found"][r]
          else "attack failed: image kept", fontsize=9)
      axes[r, 3].imshow(maps[1], cmap="inferno", vmin=0.0, vmax=vmax)
      axes[r, 3].set_title(
          f"{name} map: top-{eval_k} IN "
          f"{100 * examples['topk_intersection'][r]:.1f}%, "
          f"τ {examples['kendall_tau'][r]:.4f}", fontsize=9)
      for ax in axes[r]:
        ax.set_xticks([])
        ax.set_yticks([])
  fig.tight_layout()
  fig.savefig(path)


def plot_comparison(runs, path: str, *, title: str, max_rows: int = 4,
                    pixel_max: float = 1.0) -> int:
  """Several models' maps on the same test images, before and after attack.

  Args:
    runs: `(label, figure_examples)` pairs, `figure_examples` as saved by
      `evaluate_checkpoint` in `figure_examples.npz` (`index`, `image`,
      `saliency`, `adv_saliency`, `topk_intersection`, `kendall_tau`).
    path: the PNG to write.
    title: the figure's title.
    max_rows: at most this many test images: the first ones that every run
      attacked (correctly classified by every model).
    pixel_max: the upper end of the pixel range (to display images).

  Returns:
    The number of rows drawn (0 when no image is common to all runs; the
    figure then says so).

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (Figure 1:
    maps before and after the top-k attack).

  Example:
    >>> import os, tempfile, numpy as np
    >>> ex = dict(index=np.array([3]), image=np.zeros((1, 8, 8, 1)),
    ...           saliency=np.eye(8)[None], adv_saliency=np.eye(8)[None],
    ...           topk_intersection=np.array([0.5]),
    ...           kendall_tau=np.array([0.2]))
    >>> plot_comparison([("NATURAL", ex), ("IG-NORM", ex)],
    ...                 os.path.join(tempfile.mkdtemp(), "cmp.png"), title="t")
    1
  """
  common = sorted(set.intersection(*(
      {int(i) for i in ex["index"]} for _, ex in runs)))[:max_rows]
  cols = 1 + 2 * len(runs)
  fig = _figure(1.6 * cols, 1.9 * max(len(common), 1) + 0.7)
  fig.suptitle(title)
  if not common:
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, "No test image was attacked in every run.",
            ha="center", va="center")
  else:
    axes = fig.subplots(len(common), cols, squeeze=False)
    for r, index in enumerate(common):
      for c, (label, ex) in enumerate(runs):
        i = [int(j) for j in ex["index"]].index(index)
        if c == 0:
          _show_image(axes[r, 0], ex["image"][i], pixel_max)
          axes[r, 0].set_title(f"test #{index}", fontsize=8)
        maps = (ex["saliency"][i], ex["adv_saliency"][i])
        vmax = max(float(np.max(m)) for m in maps) or 1.0
        axes[r, 1 + 2 * c].imshow(maps[0], cmap="inferno", vmin=0.0,
                                  vmax=vmax)
        axes[r, 1 + 2 * c].set_title(f"{label}\nclean", fontsize=8)
        axes[r, 2 + 2 * c].imshow(maps[1], cmap="inferno", vmin=0.0,
                                  vmax=vmax)
        axes[r, 2 + 2 * c].set_title(
            f"attacked: IN {100 * float(ex['topk_intersection'][i]):.0f}%\n"
            f"τ {float(ex['kendall_tau'][i]):.2f}", fontsize=8)
    for ax in axes.flat:
      ax.set_xticks([])
      ax.set_yticks([])
  fig.tight_layout()
  fig.savefig(path)
  return len(common)


def plot_kendall_histogram(per_example, path: str, *, title: str) -> None:
  """Histogram of Kendall's tau over the correctly classified examples.

  Args:
    per_example: the first output of `attribution_robustness`.
    path: the PNG to write.
    title: the figure's title.

  References:
    Ghorbani, Abid, Zou, "Interpretation of Neural Networks is Fragile",
    AAAI 2019 (rank correlation after the attack).

  Example:
    >>> import os, tempfile, numpy as np
    >>> per_example = dict(correct=np.array([True, True, False]),
    ...                    kendall_tau=np.array([0.4, 0.6, np.nan]))
    >>> path = os.path.join(tempfile.mkdtemp(), "figure_kendall_hist.png")
    >>> plot_kendall_histogram(per_example, path, title="example")
    >>> os.path.getsize(path) > 0
    True
  """
  taus = per_example["kendall_tau"][per_example["correct"]]
  taus = taus[np.isfinite(taus)]
  fig = _figure(6.0, 4.0)
  ax = fig.subplots()
  low = min(0.0, float(taus.min())) if len(taus) else 0.0
  ax.hist(taus, bins=np.linspace(low, 1.0, 41), color="tab:blue",
          edgecolor="white")
  if len(taus):
    ax.axvline(float(np.mean(taus)), color="tab:red", linestyle="--",
               label=f"mean {np.mean(taus):.4f}")
    ax.legend()
  ax.set_xlabel("Kendall's τ between the clean and the attacked map")
  ax.set_ylabel("examples")
  ax.yaxis.get_major_locator().set_params(integer=True)
  ax.set_title(f"{title} (n = {len(taus)})", fontsize=10)
  fig.tight_layout()
  fig.savefig(path)


# --- Everything. --------------------------------------------------------------


def _warn_if_trained_differently(config, workdir):
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  current = json.loads(config.to_json())
  changed = [
      f"{section}.{field}: trained {saved[section][field]!r}, now "
      f"{current[section][field]!r}"
      for section, field in (("dataset", "name"), ("model", "name"),
                             ("objective", "name"),
                             ("objective", "epsilon"))
      if saved.get(section, {}).get(field) != current[section][field]]
  if changed:
    logging.warning("The config differs from the one %s was trained with "
                    "(%s): %s.", workdir, path, "; ".join(changed))


def _json_value(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def evaluate_checkpoint(config, workdir: str,
                        output_dir: Optional[str] = None, *,
                        step: Optional[int] = None,
                        num_examples: Optional[int] = None,
                        saliency: Optional[str] = None,
                        seed: Optional[int] = None,
                        dataset_name: Optional[str] = None,
                        method_name: Optional[str] = None,
                        figures: bool = True) -> dict[str, Any]:
  """Evaluates a training run's checkpoint and writes the results.

  Args:
    config: the training config (`attack.*` and `eval.*` set the attacks).
    workdir: the training workdir (`checkpoints/`, `config.json`).
    output_dir: where to write (None: `workdir`).
    step: the checkpoint step (None: the latest).
    num_examples: evaluate NA, AA and the attack on the first N test
      examples only (None: as the config says).
    saliency: override `attack.saliency` ("ig" or "gradient").
    seed: override `config.seed` (PGD starts, attack restarts).
    dataset_name: the Dataset column (None: from `dataset.name`).
    method_name: the Method column (None: from `objective.name`).
    figures: also write the two PNG figures and `figure_examples.npz`.

  Returns:
    The contents of `results.json`: `natural_accuracy`,
    `adversarial_accuracy`, `topk_intersection`, `kendall_tau`,
    `spearman_rho` (fractions; None when undefined), the counts
    (`num_examples`, `num_adversarial_examples`, `num_examples_scanned`,
    `num_examples_attacked`, `num_attacks_found`), `step`, `checkpoint`,
    `dataset`, `method`, `saliency`, `attack` (the settings used),
    `config`, `eval_seconds`.

  Raises:
    FileNotFoundError: no workdir or checkpoint (or missing data).
    CheckpointError: a corrupt checkpoint, or one whose parameters do not fit
      the config's model on the dataset's images.
    ValueError: a bad config (before anything is computed).

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (spec
    Sec. 4: NA, AA, IN, CO; Table 1 and Figure 1).

  Example:
    After `train.train_and_evaluate` on the same config; seconds on a CPU
    with the smoke preset (`tests/evaluation_test.py` runs it):

    >>> from experiments.configs import quickstart  # doctest: +SKIP
    >>> results = evaluate_checkpoint(quickstart.get_config("smoke"),
    ...                               "/tmp/rar_smoke")  # doctest: +SKIP
    >>> sorted(results)[:4]  # doctest: +SKIP
    ['adversarial_accuracy', 'attack', 'checkpoint', 'config']
  """
  t_start = time.time()
  config = _overridden(config, num_examples=num_examples, saliency=saliency,
                       seed=seed)
  # The training checks, less the training batch size, which may not split
  # over the devices of the machine that evaluates.
  checked = config.copy_and_resolve_references()
  checked.batch_size = _num_devices(config) * jax.process_count()
  train.validate_config(checked)
  validate_eval_config(config)
  output_dir = output_dir or workdir
  # --- The checkpoint, checked against the config's model and data. ---
  step, params = restore_params(workdir, step=step)
  _warn_if_trained_differently(config, workdir)
  images, labels = data_lib.load_dataset(
      config.dataset.name, config.dataset.test_split,
      data_dir=config.dataset.data_dir, pixel_max=config.dataset.pixel_max)
  checkpoint = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
  check_params(params, config, images.shape[1:],
               source=f"the checkpoint {checkpoint}")
  train.check_data(images, labels, config, split=config.dataset.test_split)
  # The model functions and placement of a training run with these settings
  # in this process, if any: their compiled steps are reused.
  programs = train._programs(config, _num_devices(config))  # pylint: disable=protected-access
  apply_fn = programs.apply_fn
  surrogate_apply_fn = programs.surrogate_apply_fn
  settings = attack_settings(config)
  # Tracing (no compilation) checks k_top, eval_k, epsilon... against the
  # image shape before any minute is spent on NA and AA.
  jax.eval_shape(
      lambda p, x, y: attribution_attack(
          apply_fn, p, x, y, surrogate_apply_fn=surrogate_apply_fn,
          key=jax.random.key(0), **settings),
      params, jax.ShapeDtypeStruct((1,) + images.shape[1:], jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.int32))

  # --- NA, AA, then the attribution attack. ---
  parallel = programs.parallel
  logging.info("Evaluating %s at step %d on %s.", workdir, step,
               config.dataset.name)
  results = accuracies(config, apply_fn, params, images, labels,
                       parallel=parallel)
  logging.info("NA %.4f on %d examples, AA %.4f on %d examples.",
               results["natural_accuracy"], results["num_examples"],
               results["adversarial_accuracy"],
               results["num_adversarial_examples"])
  per_example, examples = attribution_robustness(
      config, apply_fn, surrogate_apply_fn, params, images, labels,
      parallel=parallel)
  summary = summarize(per_example)
  results.update(summary)
  if summary["num_examples_attacked"] and summary["kendall_tau"] is None:
    logging.warning(
        "Some correctly classified examples have a constant saliency map "
        "(NaN metrics); IN/CO are undefined. See per_example.npz.")
  results.update(
      step=step, checkpoint=checkpoint,
      dataset=dataset_name or dataset_label(config),
      method=method_name or method_label(config),
      saliency=config.attack.saliency,
      attack=dict(settings), pgd=_pgd_attack_kwargs(config),
      pgd_num_restarts=config.eval.pgd_num_restarts,
      config=json.loads(config.to_json()),
      eval_seconds=time.time() - t_start)
  results = {k: _json_value(v) for k, v in results.items()}

  # --- Files (one writer). ---
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
    write_table([results], os.path.join(output_dir, "results"))
    np.savez(os.path.join(output_dir, "per_example.npz"), **per_example)
    if figures:
      # The figure's data, for comparisons across models (combine.py).
      np.savez(os.path.join(output_dir, "figure_examples.npz"),
               **{k: np.asarray(v) for k, v in examples.items()})
      title = f"{results['dataset']} {results['method']} (step {step})"
      plot_saliency(examples, os.path.join(output_dir, "figure_saliency.png"),
                    title=title, saliency=config.attack.saliency,
                    epsilon=settings["epsilon"], eval_k=settings["eval_k"],
                    pixel_max=config.objective.clip_max or 1.0)
      plot_kendall_histogram(
          per_example, os.path.join(output_dir, "figure_kendall_hist.png"),
          title=f"{title}: Kendall's τ after the attack")
  logging.info("Results: %s", " | ".join(table_row(results)))
  return results


__all__ = [
    "CheckpointError", "METRICS", "TABLE_COLUMNS", "restore_params",
    "check_params", "attack_settings", "validate_eval_config",
    "dataset_label", "method_label", "attack_step", "pgd_restarts_step",
    "accuracies", "attribution_robustness", "summarize", "table_row",
    "write_table", "plot_saliency", "plot_comparison", "plot_kendall_histogram",
    "evaluate_checkpoint",
]

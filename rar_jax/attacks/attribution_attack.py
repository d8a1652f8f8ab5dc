"""The attribution attacks of Ghorbani, Abid and Zou, batched and compiled.

`attribution_attack(apply_fn, params, inputs, labels, ...)` perturbs each
image inside the epsilon-ball so that its saliency map changes as much as
possible while the predicted label stays the same, as the paper evaluates
(spec section 4.2):

1. the reference map `S(x)` is the IG of the true-class logit from a black
   baseline (100 right-Riemann points), summed over channels and rescaled
   to sum to H*W (`saliency_map`); `saliency="gradient"` uses the plain
   gradient instead;
2. each step moves by `step_size` along the sign of `-grad T(x')`, where `T`
   is computed on the smooth surrogate network (`surrogate_apply_fn`, e.g.
   softplus for ReLU) and `grad` is the exact `jax.grad` through IG; then it
   projects onto the ball and the pixel box (and truncates to integers with
   `quantize=True`, as the original GTSRB/Flower code);
3. an iterate that changes the predicted label (on the original network) is
   rejected; of the others the one with the lowest Kendall tau between `S(x)`
   and `S(x')` is kept (starting from tau = 1: no admissible improvement keeps
   `x` itself and reports (1, 1, 1));
4. with `num_restarts > 1` the attack also runs from random points of the
   ball and the worst case (lowest tau) is kept. `num_restarts=1` is the
   paper's protocol: its three repeats all start at `x` and, the attack being
   deterministic, give the same result; random restarts (restart 0 still
   starts at `x`) make a stronger attack than the paper's, so IN and CO can
   only go down.

The top-k mask breaks ties towards the lower pixel index (`lax.top_k`). With
the black baseline every zero pixel of an MNIST digit has zero saliency, so
when fewer than `k_top` pixels are salient the mask is filled with the first
background pixels in raster order; the original's `numpy.argsort` filled it
with arbitrary background pixels. Either way those pixels carry no mass.

Attacks (`attack=`): `topk` minimises `T = sum of S(x')` over the original
top-`k_top` pixels; `mass_center` maximises the shift of the saliency's centre
of mass; `target` maximises the saliency inside `target_mask`; `random` draws
a random sign perturbation of size epsilon every step (no gradient).

All examples and restarts are one batch and the steps one `lax.fori_loop`, so
the whole attack is a single compiled program.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rar_jax import checks
from rar_jax import metrics
from rar_jax.attacks import pgd_attack
from rar_jax.attribution import auto_chunk_size
from rar_jax.attribution import gradient_saliency
from rar_jax.attribution import integrated_gradients
from rar_jax.attribution import saliency_map
from rar_jax.attribution import unrolled_chunk_size

Array = jax.Array

ATTACKS = ("topk", "mass_center", "target", "random")
SALIENCIES = ("ig", "gradient")
# On CPU the attack unrolls its IG chunks up to this many images (rows x
# points), the range measured; beyond, a scan (BUILD.md, Performance, items 7
# and 8). The name dates from item 7, when these took all points at once.
CPU_IMAGES_AT_ONCE = 4800


def attack_chunk_size(num_rows: int, num_ig_steps: int,
                      platform: Optional[str] = None) -> Optional[int]:
  """What `chunk_size="auto"` means in the attack: IG points at once.

  Differentiating a chunked IG stores every chunk's residuals, so chunks do
  not bound the attack's memory; in a `lax.scan` on CPU they cost time too.
  So, on CPU, while `num_rows * num_ig_steps <= CPU_IMAGES_AT_ONCE` (the
  range measured): `attribution.unrolled_chunk_size`, at most
  `attribution.MAX_UNROLLED_CHUNKS` chunks that the attack unrolls
  (0.80-0.90x the time of all points at once); beyond,
  `attribution.auto_chunk_size` in a scan; on GPU/TPU that rule too (all
  points).

  Args:
    num_rows: examples times restarts, attacked at once.
    num_ig_steps: IG points per saliency map.
    platform: "cpu", "gpu", "tpu", ...; None: `jax.default_backend()`.

  Returns:
    An int chunk size, or None for all points at once.

  References:
    `BUILD.md`, "Performance", items 7 and 8 (the measurements behind the
    rule).

  Example:
    >>> attack_chunk_size(12, 100, "cpu")    # 1,200 images: 20 chunks, unrolled
    5
    >>> attack_chunk_size(300, 100, "cpu")   # 30,000: 100 chunks, a scan
    1
    >>> attack_chunk_size(12, 100, "gpu") is None
    True
  """
  return attack_chunking(num_rows, num_ig_steps, platform)[0]


def attack_chunking(num_rows: int, num_ig_steps: int,
                    platform: Optional[str] = None
                    ) -> tuple[Optional[int], bool]:
  """`chunk_size="auto"` in the attack: the chunk, and whether it unrolls.

  Args:
    num_rows: examples times restarts, attacked at once.
    num_ig_steps: IG points per saliency map.
    platform: "cpu", "gpu", "tpu", ...; None: `jax.default_backend()`.

  Returns:
    `(chunk_size, unroll_chunks)`: `attack_chunk_size`'s chunk (None: all
    points at once), and True where the attack traces its chunks one after
    another (on CPU, up to `CPU_IMAGES_AT_ONCE` images), False where it
    runs them in a `lax.scan`.

  References:
    `BUILD.md`, "Performance", items 7 and 8.

  Example:
    >>> attack_chunking(12, 100, "cpu"), attack_chunking(300, 100, "cpu")
    ((5, True), (1, False))
  """
  platform = platform or jax.default_backend()
  if platform == "cpu" and num_rows * num_ig_steps <= CPU_IMAGES_AT_ONCE:
    return unrolled_chunk_size(num_rows, num_ig_steps, platform), True
  return auto_chunk_size(num_rows, num_ig_steps, platform), False


def saliency_fn(apply_fn, params, labels, *, saliency="ig", num_ig_steps=100,
                chunk_size="auto", unroll_chunks=False):
  """`x [N, H, W(, C)] -> S(x) [N, H, W]`: the paper's evaluation saliency.

  IG (black baseline, `num_ig_steps` right-Riemann points) or the plain
  gradient of the logit of `labels`, then `saliency_map`.

  Args:
    apply_fn: `(params, x) -> logits [N, C]`.
    params: model parameters.
    labels: `[N]` int classes whose logit is explained.
    saliency: `"ig"` or `"gradient"`.
    num_ig_steps: IG points (the paper: 100).
    chunk_size: IG points evaluated at once, as in `integrated_gradients`
      (None: all; "auto": by device).
    unroll_chunks: trace IG's chunks one after another, as in
      `integrated_gradients`.

  Returns:
    A function from inputs `[N, H, W, C]` to maps `[N, H, W]`.

  Raises:
    ValueError: an unknown `saliency`.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019
    (evaluation saliency, spec section 4.2); Sundararajan, Taly, Yan,
    "Axiomatic Attribution for Deep Networks", ICML 2017.

  Example:
    >>> import jax.numpy as jnp
    >>> apply_fn = lambda p, x: x.reshape(len(x), -1) @ p   # linear, 2 classes
    >>> fn = saliency_fn(apply_fn, jnp.ones((4, 2)), jnp.array([0]),
    ...                  num_ig_steps=10)
    >>> fn(jnp.full((1, 2, 2, 1), 0.5))                     # [1, 2, 2]
    Array([[[1., 1.],
            [1., 1.]]], dtype=float32)
  """
  if saliency not in SALIENCIES:
    raise ValueError(f"Unknown saliency {saliency!r}; accepted: "
                     f"{', '.join(SALIENCIES)}.")

  def logit_y(z):
    return jnp.take_along_axis(apply_fn(params, z), labels[:, None], -1)[:, 0]

  def fn(x):
    if saliency == "ig":
      attr = integrated_gradients(logit_y, x, num_steps=num_ig_steps,
                                  chunk_size=chunk_size,
                                  unroll_chunks=unroll_chunks)
    else:
      attr = gradient_saliency(logit_y, x)
    return saliency_map(attr)

  return fn


def _centre_of_mass(maps):
  h, w = maps.shape[1:]
  total = jnp.maximum(jnp.sum(maps, axis=(1, 2)), 1e-12)
  rows = jnp.sum(maps * jnp.arange(h)[None, :, None], axis=(1, 2)) / total
  cols = jnp.sum(maps * jnp.arange(w)[None, None, :], axis=(1, 2)) / total
  return jnp.stack([rows, cols], axis=-1)


def _check_k(name, k, size):
  if (isinstance(k, bool) or not isinstance(k, (int, np.integer))
      or not 1 <= k <= size):
    raise ValueError(
        f"{name}={k!r} is not accepted for maps of {size} pixels; accepted: "
        f"an int with 1 <= {name} <= {size}.")


def attribution_attack(
    apply_fn: Callable[[object, Array], Array],
    params,
    inputs: Array,
    labels: Array,
    *,
    epsilon,
    step_size,
    num_steps: int,
    k_top: int,
    eval_k: Optional[int] = None,
    surrogate_apply_fn: Optional[Callable[[object, Array], Array]] = None,
    attack: str = "topk",
    saliency: str = "ig",
    num_ig_steps: int = 100,
    num_restarts: int = 1,
    key: Optional[Array] = None,
    target_mask: Optional[Array] = None,
    clip_min: Optional[float] = 0.0,
    clip_max: Optional[float] = 1.0,
    quantize: bool = False,
    chunk_size: Optional[int] | str = "auto",
) -> dict[str, Array]:
  """Attacks the saliency maps of a batch of images; returns per-example results.

  Args:
    apply_fn: `(params, x [N, H, W, C]) -> logits [N, classes]`, the network
      whose saliency is measured and whose label must not change (ReLU).
    params: model parameters (shared by both networks).
    inputs: `[N, H, W, C]` images.
    labels: `[N]` int true labels.
    epsilon: l-inf radius of the ball (>= 0).
    step_size: step length (> 0).
    num_steps: attack iterations (>= 1).
    k_top: size of the top-k mask the `topk` attack removes mass from.
    eval_k: k of the reported top-k intersection (default: `k_top`).
    surrogate_apply_fn: the smooth network the attack direction is computed
      on (same parameters); default `apply_fn`.
    attack: one of `ATTACKS`.
    saliency: `"ig"` (the paper's main results) or `"gradient"` (simple
      gradient).
    num_ig_steps: IG points for every saliency (the paper: 100).
    num_restarts: runs per example; the worst case is kept. Restart 0 starts
      at the image (1: the paper's protocol), the others at random points of
      the ball (needs `key`; a stronger attack than the paper's).
    key: PRNG key (random restarts, `random` and `mass_center` attacks).
    target_mask: `[H, W]` or `[N, H, W]` region for `attack="target"`.
    clip_min: lower end of the pixel box (None: open).
    clip_max: upper end of the pixel box (None: open).
    quantize: truncate pixels to integers after every step (GTSRB/Flower).
    chunk_size: IG points evaluated at once, as in `integrated_gradients`,
      in a `lax.scan` (None: all; "auto", the default: `attack_chunk_size`,
      its chunks unrolled on CPU up to `CPU_IMAGES_AT_ONCE` images).

  Returns:
    A dict of arrays with a leading `[N]` axis:
    `adv_inputs` `[N, H, W, C]` (the kept iterate; `inputs` where none was
    admissible), `clean_saliency` and `adv_saliency` `[N, H, W]`,
    `topk_intersection`, `kendall_tau`, `spearman_rho`, `mass_center_shift`
    (float, NaN for misclassified examples), `attacked` (bool: the clean
    prediction was correct, so the example counts in the paper's averages) and
    `found` (bool: an admissible iterate lowered tau).

  Raises:
    ValueError: bad hyper-parameters or names, `k_top`/`eval_k` outside
      `[1, H*W]`, a missing `target_mask` or `key`.

  References:
    Ghorbani, Abid, Zou, "Interpretation of Neural Networks is Fragile",
    AAAI 2019; Chen et al., "Robust Attribution Regularization", NeurIPS 2019
    (evaluation protocol, section 4.2 of the spec).

  Example:
    >>> import functools, jax, jax.numpy as jnp
    >>> w = jax.random.normal(jax.random.key(0), (16, 3))
    >>> apply_fn = lambda p, x: jnp.tanh(x.reshape(len(x), -1) @ p)
    >>> x = jax.random.uniform(jax.random.key(1), (2, 4, 4, 1))
    >>> y = jnp.argmax(apply_fn(w, x), axis=-1)
    >>> attack = jax.jit(functools.partial(          # one compiled program
    ...     attribution_attack, apply_fn, epsilon=0.1, step_size=0.02,
    ...     num_steps=5, k_top=4, num_ig_steps=10))
    >>> out = attack(w, x, y)
    >>> out["kendall_tau"].shape, bool(jnp.all(out["kendall_tau"] <= 1))
    ((2,), True)
  """
  pgd_attack.check_attack_args(epsilon=epsilon, step_size=step_size,
                               num_steps=num_steps, clip_min=clip_min,
                               clip_max=clip_max)
  if attack not in ATTACKS:
    raise ValueError(f"Unknown attack {attack!r}; accepted: "
                     f"{', '.join(ATTACKS)}.")
  if saliency not in SALIENCIES:
    raise ValueError(f"Unknown saliency {saliency!r}; accepted: "
                     f"{', '.join(SALIENCIES)}.")
  if np.ndim(inputs) not in (3, 4):
    raise ValueError(
        f"inputs of shape {tuple(np.shape(inputs))} are not accepted; "
        "accepted: images [N, H, W, C] or [N, H, W].")
  checks.check_in_box("inputs", inputs, clip_min, clip_max)
  num_classes = None
  if checks.host_value(inputs) is not None:
    num_classes = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct(
        np.shape(inputs), jnp.result_type(inputs))).shape[-1]
  checks.check_labels(labels, num_examples=np.shape(inputs)[0],
                      num_classes=num_classes)
  n, h, w = np.shape(inputs)[:3]
  _check_k("k_top", k_top, h * w)
  eval_k = k_top if eval_k is None else eval_k
  _check_k("eval_k", eval_k, h * w)
  if (isinstance(num_restarts, bool)
      or not isinstance(num_restarts, (int, np.integer)) or num_restarts < 1):
    raise ValueError(f"num_restarts={num_restarts!r} is not accepted; it must "
                     "be an int >= 1.")
  needs_key = (num_restarts > 1 or attack in ("random", "mass_center"))
  if needs_key and key is None:
    raise ValueError(
        f"attack={attack!r} with num_restarts={num_restarts} needs a PRNG key "
        "(random starts or random perturbations); got key=None.")
  if attack == "target":
    if target_mask is None:
      raise ValueError("attack='target' needs target_mask, [H, W] or "
                       "[N, H, W]; got None.")
    target_mask = jnp.asarray(target_mask, jnp.result_type(inputs))
    if target_mask.shape not in ((h, w), (n, h, w)):
      raise ValueError(
          f"target_mask of shape {tuple(target_mask.shape)} is not accepted; "
          f"accepted: ({h}, {w}) or ({n}, {h}, {w}).")
    target_mask = jnp.broadcast_to(target_mask, (n, h, w))
  inputs = jnp.asarray(inputs)
  labels = jnp.asarray(labels)
  surrogate_apply_fn = surrogate_apply_fn or apply_fn
  key = jax.random.key(0) if key is None else key
  inputs = jax.lax.stop_gradient(inputs)

  # --- One batch of N * R: restart r of example i is row r * N + i.
  r = num_restarts
  tile = lambda v: jnp.tile(v, (r,) + (1,) * (v.ndim - 1))
  xs, ys = tile(inputs), tile(labels)
  unroll = False
  if chunk_size == "auto":
    chunk_size, unroll = attack_chunking(len(xs), num_ig_steps)
  sal_kw = dict(saliency=saliency, num_ig_steps=num_ig_steps,
                chunk_size=chunk_size, unroll_chunks=unroll)
  measure = saliency_fn(apply_fn, params, ys, **sal_kw)
  surrogate = saliency_fn(surrogate_apply_fn, params, ys, **sal_kw)
  predict = lambda x: jnp.argmax(apply_fn(params, x), axis=-1)
  project = lambda x: _project(x, xs, epsilon, clip_min, clip_max, quantize)

  s_ref = tile(jax.lax.stop_gradient(
      saliency_fn(apply_fn, params, labels, **sal_kw)(inputs)))
  top = jax.lax.top_k(s_ref.reshape(n * r, -1), k_top)[1]
  top_mask = jnp.zeros((n * r, h * w), s_ref.dtype).at[
      jnp.arange(n * r)[:, None], top].set(1.0).reshape(s_ref.shape)
  centre_ref = _centre_of_mass(s_ref)
  target = None if target_mask is None else tile(target_mask)

  def objective(x):  # per example, to be minimised
    s = surrogate(x)
    if attack == "topk":
      return jnp.sum(top_mask * s, axis=(1, 2))
    if attack == "target":
      return -jnp.sum(target * s, axis=(1, 2))
    shift = _centre_of_mass(s) - centre_ref
    return -jnp.sqrt(jnp.sum(shift ** 2, axis=-1) + 1e-12)

  grad_fn = jax.grad(lambda x: jnp.sum(objective(x)))
  key_start, key_steps = jax.random.split(key)
  x0 = pgd_attack.random_start(key_start, xs, epsilon=epsilon)
  if attack != "mass_center":  # restart 0 starts at the image, as the paper
    x0 = x0.at[:n].set(inputs)
  x0 = project(x0)

  def step(t, carry):
    x_adv, best_x, best_s, best_tau = carry
    if attack == "random":
      signs = jnp.sign(jax.random.uniform(jax.random.fold_in(key_steps, t),
                                          xs.shape, minval=-1.0, maxval=1.0))
      x_adv = project(xs + epsilon * signs)
    else:
      x_adv = project(x_adv - step_size * jnp.sign(grad_fn(x_adv)))
    s = measure(x_adv)
    tau = metrics.kendall_tau(s_ref, s)
    admissible = (predict(x_adv) == ys) & ~jnp.isnan(tau)
    better = admissible & (tau < best_tau)
    pick = lambda new, old: jnp.where(
        better.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    return (x_adv, pick(x_adv, best_x), pick(s, best_s),
            jnp.where(better, tau, best_tau))

  # tau starts at 1 (derived from s_ref so that, under shard_map, the carry
  # has the same device variance as the values that replace it).
  init = (x0, xs, s_ref, jnp.ones_like(s_ref[:, 0, 0]))
  _, best_x, best_s, best_tau = jax.lax.fori_loop(0, num_steps, step, init)

  # --- Worst case over restarts: the lowest tau of each example.
  winner = jnp.argmin(best_tau.reshape(r, n), axis=0) * n + jnp.arange(n)
  best_x, best_s, best_tau = best_x[winner], best_s[winner], best_tau[winner]
  s_ref = s_ref[:n]
  attacked = predict(inputs) == labels
  nan_if_skipped = lambda v: jnp.where(attacked, v, jnp.nan)
  return dict(
      adv_inputs=jax.lax.stop_gradient(best_x),
      clean_saliency=s_ref,
      adv_saliency=best_s,
      topk_intersection=nan_if_skipped(
          metrics.topk_intersection(s_ref, best_s, k=eval_k)),
      kendall_tau=nan_if_skipped(metrics.kendall_tau(s_ref, best_s)),
      spearman_rho=nan_if_skipped(metrics.spearman_rho(s_ref, best_s)),
      mass_center_shift=nan_if_skipped(
          metrics.mass_center_shift(s_ref, best_s)),
      attacked=attacked,
      found=attacked & (best_tau < 1.0),
  )


def _project(x, centres, epsilon, clip_min, clip_max, quantize):
  x = pgd_attack.project(x, centres, epsilon=epsilon, norm="linf",
                         clip_min=clip_min, clip_max=clip_max)
  # The original GTSRB/Flower attack casts to int32: truncation toward zero.
  return jnp.trunc(x) if quantize else x


__all__ = ["ATTACKS", "SALIENCIES", "CPU_IMAGES_AT_ONCE", "attack_chunk_size",
           "attack_chunking",
           "attribution_attack", "saliency_fn"]

"""Projected gradient ascent (PGD): one compiled maximiser for every inner problem.

`pgd(objective_fn, inputs, epsilon=..., step_size=..., num_steps=...)`
maximises `sum(objective_fn(x_adv))` over the epsilon-ball around `inputs`
(and the pixel box). The same function serves Madry training (cross-entropy),
the IG-NORM and IG-SUM-NORM inner problems of the paper, TRADES and the PGD
evaluation. The loop is a `lax.fori_loop`, so compile time does not grow with
`num_steps`, and the result has its gradient stopped.

Example:
  >>> import jax, jax.numpy as jnp
  >>> w = jnp.array([1.0, -1.0])
  >>> x_adv = pgd(lambda x: x @ w, jnp.full((1, 2), 0.5), epsilon=0.1,
  ...             step_size=0.05, num_steps=3)
  >>> x_adv
  Array([[0.6, 0.4]], dtype=float32)
"""

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rar_jax import checks

Array = jax.Array

NORMS = ("linf", "l2")


def check_attack_args(*, epsilon, step_size, num_steps, norm="linf",
                      clip_min=None, clip_max=None):
  """Raises a ValueError naming the first bad attack hyper-parameter.

  Traced values (under `jit`) are not checked; Python numbers are.

  Args:
    epsilon: radius of the ball (>= 0).
    step_size: step length (> 0).
    num_steps: number of steps (int >= 1).
    norm: one of `NORMS`.
    clip_min: lower end of the pixel box, or None.
    clip_max: upper end of the pixel box, or None (> `clip_min`).

  Raises:
    ValueError: the first argument outside its range, named with its value.

  References:
    Madry et al., "Towards Deep Learning Models Resistant to Adversarial
    Attacks", ICLR 2018 (the attack's hyper-parameters).

  Example:
    >>> check_attack_args(epsilon=0.3, step_size=0.01, num_steps=40)
    >>> check_attack_args(epsilon=0.3, step_size=0.0, num_steps=40)
    Traceback (most recent call last):
      ...
    ValueError: step_size=0.0 is not accepted; it must be a number > 0.
  """
  if isinstance(epsilon, bool) or (
      checks.is_concrete_number(epsilon) and not epsilon >= 0):
    raise ValueError(
        f"epsilon={epsilon!r} is not accepted; it must be a number >= 0 (the "
        "radius of the threat ball).")
  if isinstance(step_size, bool) or (
      checks.is_concrete_number(step_size) and not step_size > 0):
    raise ValueError(
        f"step_size={step_size!r} is not accepted; it must be a number > 0.")
  if (isinstance(num_steps, bool)
      or not isinstance(num_steps, (int, np.integer)) or num_steps < 1):
    raise ValueError(
        f"num_steps={num_steps!r} is not accepted; it must be an int >= 1.")
  if norm not in NORMS:
    raise ValueError(
        f"Unknown norm {norm!r}; accepted: {', '.join(NORMS)}.")
  if (checks.is_concrete_number(clip_min)
      and checks.is_concrete_number(clip_max)
      and not clip_min < clip_max):
    raise ValueError(
        f"clip_min={clip_min!r} must be smaller than clip_max={clip_max!r} "
        "(or either may be None to leave that side of the box open).")


def _per_example_norm(v):
  axes = tuple(range(1, v.ndim))
  return jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True))


def _clip_box(x, clip_min, clip_max):
  if clip_min is None and clip_max is None:
    return x
  return jnp.clip(x, clip_min, clip_max)


def project(x_adv, inputs, *, epsilon, norm="linf", clip_min=0.0,
            clip_max=1.0):
  """Projects `x_adv [N, *S]` onto the epsilon-ball around `inputs`, then the box.

  Args:
    x_adv: `[N, *S]` points to project.
    inputs: `[N, *S]` centres of the balls.
    epsilon: radius.
    norm: `"linf"` or `"l2"` (per example).
    clip_min: lower end of the pixel box, or None for no lower bound.
    clip_max: upper end of the pixel box, or None for no upper bound.

  Returns:
    `[N, *S]` projected points.

  References:
    Madry et al., "Towards Deep Learning Models Resistant to Adversarial
    Attacks", ICLR 2018 (projected gradient descent).

  Example:
    >>> import jax.numpy as jnp
    >>> project(jnp.array([[0.9, -0.5]]), jnp.array([[0.5, 0.0]]),
    ...         epsilon=0.2)
    Array([[0.7, 0. ]], dtype=float32)
  """
  delta = x_adv - inputs
  if norm == "linf":
    delta = jnp.clip(delta, -epsilon, epsilon)
  elif norm == "l2":
    n = _per_example_norm(delta)
    delta = delta * jnp.minimum(1.0, epsilon / jnp.maximum(n, 1e-12))
  else:
    raise ValueError(f"Unknown norm {norm!r}; accepted: {', '.join(NORMS)}.")
  return _clip_box(inputs + delta, clip_min, clip_max)


def _is_key_batch(key):
  """True for `[N]` typed keys (or `[N, 2]` raw uint32 keys)."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 1
  return key.ndim == 2


def random_start(key, inputs, *, epsilon, norm="linf"):
  """A uniform random point of the epsilon-ball around each input.

  For `linf` every coordinate moves by `U(-epsilon, epsilon)`, as the original
  code does; for `l2` the point is uniform in the ball. The start is not
  clipped to the pixel box (the original code's behaviour); the first PGD step
  projects it.

  Args:
    key: a PRNG key, or `[N]` keys, one per example (then each example's start
      depends on its own key only, so a batch split over devices draws the
      same starts as on one device).
    inputs: `[N, *S]` centres.
    epsilon: radius.
    norm: `"linf"` or `"l2"`.

  Returns:
    `[N, *S]` random points.

  References:
    Madry et al., "Towards Deep Learning Models Resistant to Adversarial
    Attacks", ICLR 2018 (PGD's random start).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x0 = random_start(jax.random.key(0), jnp.zeros((2, 3)), epsilon=0.1)
    >>> x0.shape, bool(jnp.all(jnp.abs(x0) <= 0.1))
    ((2, 3), True)
  """
  if _is_key_batch(key):
    if key.shape[0] != inputs.shape[0]:
      raise ValueError(
          f"A batch of {key.shape[0]} PRNG keys does not match "
          f"{inputs.shape[0]} inputs; accepted: one key, or one per example.")
    one = lambda k, x: random_start(k, x[None], epsilon=epsilon, norm=norm)[0]
    return jax.vmap(one)(key, inputs)
  if norm == "linf":
    return inputs + jax.random.uniform(
        key, inputs.shape, inputs.dtype, -epsilon, epsilon)
  if norm == "l2":
    k_dir, k_rad = jax.random.split(key)
    d = math.prod(inputs.shape[1:])
    direction = jax.random.normal(k_dir, inputs.shape, inputs.dtype)
    direction = direction / jnp.maximum(_per_example_norm(direction), 1e-12)
    radius = epsilon * jax.random.uniform(
        k_rad, (inputs.shape[0],) + (1,) * (inputs.ndim - 1),
        inputs.dtype) ** (1.0 / d)
    return inputs + radius * direction
  raise ValueError(f"Unknown norm {norm!r}; accepted: {', '.join(NORMS)}.")


def pgd(
    objective_fn: Callable[[Array], Array],
    inputs: Array,
    *,
    epsilon,
    step_size,
    num_steps: int,
    key: Optional[Array] = None,
    norm: str = "linf",
    clip_min: Optional[float] = 0.0,
    clip_max: Optional[float] = 1.0,
) -> Array:
  """Maximises `sum(objective_fn(x_adv))` over the epsilon-ball around `inputs`.

  Each of the `num_steps` steps moves along the sign of the gradient (`linf`)
  or the per-example normalised gradient (`l2`) by `step_size`, then projects
  onto the ball and then onto `[clip_min, clip_max]`. With a `key` the start
  is uniform in the ball (as in the original code); without, it is `inputs`.

  Args:
    objective_fn: per-example objective `[N, *S] -> [N]` to maximise; output
      `i` must depend on input `i` only.
    inputs: `[N, *S]` natural inputs (centres of the balls).
    epsilon: radius of the ball (>= 0).
    step_size: step length (> 0).
    num_steps: number of steps (int >= 1).
    key: PRNG key for the random start (or `[N]` keys, one per example; see
      `random_start`), or None to start at `inputs`.
    norm: `"linf"` or `"l2"`.
    clip_min: lower end of the pixel box; None leaves it open.
    clip_max: upper end of the pixel box; None leaves it open.

  Returns:
    `[N, *S]` adversarial inputs, inside the ball and the box, with their
    gradient stopped.

  Raises:
    ValueError: epsilon < 0, step_size <= 0, num_steps < 1, an unknown norm,
      `clip_min >= clip_max`, or an `objective_fn` that does not return `[N]`.

  References:
    Madry et al., "Towards Deep Learning Models Resistant to Adversarial
    Attacks", ICLR 2018; Chen et al., "Robust Attribution Regularization",
    NeurIPS 2019 (the inner maximisation of IG-NORM / IG-SUM-NORM).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.zeros((2, 3))
    >>> x_adv = pgd(lambda z: jnp.sum(z ** 2, axis=-1), x, epsilon=0.3,
    ...             step_size=0.1, num_steps=5, key=jax.random.key(0),
    ...             clip_min=-1.0, clip_max=1.0)
    >>> bool(jnp.all(jnp.abs(x_adv) == 0.3))
    True
  """
  check_attack_args(epsilon=epsilon, step_size=step_size, num_steps=num_steps,
                    norm=norm, clip_min=clip_min, clip_max=clip_max)
  checks.check_in_box("inputs", inputs, clip_min, clip_max)
  inputs = jnp.asarray(inputs)
  out = jax.eval_shape(objective_fn, inputs)
  if tuple(getattr(out, "shape", ())) != (inputs.shape[0],):
    raise ValueError(
        f"objective_fn must map inputs of shape {tuple(inputs.shape)} to "
        f"per-example values of shape ({inputs.shape[0]},); it returned "
        f"shape {getattr(out, 'shape', type(out).__name__)}.")
  inputs = jax.lax.stop_gradient(inputs)
  grad_fn = jax.grad(lambda z: jnp.sum(objective_fn(z)))

  def step(_, x_adv):
    g = grad_fn(x_adv)
    if norm == "linf":
      x_adv = x_adv + step_size * jnp.sign(g)
    else:
      x_adv = x_adv + step_size * g / jnp.maximum(_per_example_norm(g), 1e-12)
    return project(x_adv, inputs, epsilon=epsilon, norm=norm,
                   clip_min=clip_min, clip_max=clip_max)

  x0 = inputs if key is None else random_start(key, inputs, epsilon=epsilon,
                                               norm=norm)
  x_adv = jax.lax.fori_loop(0, num_steps, step, x0)
  return jax.lax.stop_gradient(x_adv)


__all__ = ["NORMS", "pgd", "project", "random_start", "check_attack_args"]

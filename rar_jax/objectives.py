"""The training objectives of the paper, as per-example losses.

Every objective has the signature

    objective(apply_fn, params, inputs, labels, *, key, **hyper)
        -> (per_example_loss [N], aux)

with `apply_fn(params, x [N, *S]) -> logits [N, C]` and `labels [N]` int.
`OBJECTIVES` maps the names `natural`, `madry`, `trades`, `ig_norm`,
`ig_sum_norm` and `ig_wasserstein` to them, and `loss` reduces one to the
scalar the optimiser sees:

    total, aux = loss("ig_norm", apply_fn, params, x, y, key=key,
                      epsilon=0.3, step_size=0.01, num_steps=40, m=50,
                      approx_factor=5, lam=1.0, reduction="sum")

All objectives accept the same hyper-parameter keywords (`HYPER_KEYS`) and
ignore those they do not use, so a config can pass one dict to any of them.
`aux` always holds `ce` (clean cross-entropy [N]), `adv_ce` (cross-entropy at
the adversarial input [N]), `reg` (the regulariser [N]: the IG norm, the KL of
TRADES, or zero), `adv_inputs` ([N, *S]) and `logits` (clean logits [N, C]).

Batch reduction: the original code sums the IG-* losses over the batch
(`reduction="sum"`), the paper's formulas take the per-example mean
(`reduction="mean"`). The per-example values are identical; only the scale
of the gradient differs by the batch size B. Adam is invariant to that scale
(up to its epsilon), so the paper's Adam learning rates transfer either way;
with SGD, `sum` at learning rate `lr` equals `mean` at `lr * B` (and a weight
decay of `wd / B`).
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rar_jax import checks
from rar_jax.attacks import pgd_attack as pgd_lib
from rar_jax.attribution import integrated_gradients
from rar_jax.attribution import unrolled_chunk_size

Array = jax.Array

REDUCTIONS = ("sum", "mean")
HYPER_KEYS = ("epsilon", "step_size", "num_steps", "m", "approx_factor", "lam",
              "gamma", "clip_min", "clip_max", "reduction")


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Per-example softmax cross-entropy, `[N, C], [N] -> [N]`.

  Computed from `log_softmax`, which is stable for any logits. (On the IG
  path, the original TF code used `-log(clip(softmax, 1e-10, 1))`, whose
  gradient vanishes when `p_y < 1e-10`; the two agree everywhere else. Its
  other cross-entropies were, as here, computed from the logits.)

  Args:
    logits: `[N, C]` class scores.
    labels: `[N]` int class indices in `[0, C)`.

  Returns:
    `[N]` losses, `-log softmax(logits)[label]`.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (the loss
    `l(x, y)` of every objective; spec section 3.1).

  Example:
    >>> import jax.numpy as jnp
    >>> cross_entropy(jnp.zeros((1, 4)), jnp.array([2]))
    Array([1.3862944], dtype=float32)
  """
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32),
                              axis=-1)[:, 0]


def _l1(v):
  return jnp.sum(jnp.abs(v), axis=tuple(range(1, v.ndim)))


_ATTACK = ("epsilon", "step_size", "num_steps")
_NEEDS = {
    "natural": (),
    "madry": _ATTACK,
    "trades": _ATTACK + ("lam",),
    "ig_norm": _ATTACK + ("lam",),
    "ig_sum_norm": _ATTACK + ("lam",),
    "ig_wasserstein": _ATTACK + ("lam", "gamma"),
}
_USES_IG = ("ig_norm", "ig_sum_norm", "ig_wasserstein")


def check_hyper(name: str, hyper: dict) -> None:
  """Raises a ValueError naming the first bad hyper-parameter of an objective.

  Checks unknown keywords, missing required ones, and their ranges (epsilon
  >= 0, step_size > 0, num_steps >= 1, lam and gamma >= 0, approx_factor
  dividing m, a known reduction), so that a bad config fails before any
  compilation.

  Args:
    name: a name in `OBJECTIVES`.
    hyper: the hyper-parameter keywords (`HYPER_KEYS`).

  Raises:
    ValueError: an unknown objective or keyword, a missing keyword, or a
      value out of range; the message names it and the accepted values.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (the
    hyper-parameters of each objective, spec sections 3.1-3.2).

  Example:
    >>> check_hyper("ig_norm", dict(epsilon=0.1, step_size=0.01, num_steps=10,
    ...                             lam=1.0, m=10, approx_factor=3))
    Traceback (most recent call last):
      ...
    ValueError: approx_factor=3 is not accepted with m=10; it must be an int
    >= 1 that divides m (divisors of 10: [1, 2, 5, 10]).
  """
  if name not in _NEEDS:
    get_objective(name)
  needs, uses_ig = _NEEDS[name], name in _USES_IG
  unknown = sorted(set(hyper) - set(HYPER_KEYS))
  if unknown:
    raise ValueError(
        f"Unknown hyper-parameter(s) {unknown} for objective {name!r}; "
        f"accepted: {', '.join(HYPER_KEYS)}.")
  missing = [k for k in needs if hyper.get(k) is None]
  if missing:
    raise ValueError(
        f"Objective {name!r} needs the hyper-parameter(s) {missing}; got "
        f"{sorted(k for k, v in hyper.items() if v is not None)}.")
  if {"epsilon", "step_size", "num_steps"} <= set(needs):
    pgd_lib.check_attack_args(
        epsilon=hyper["epsilon"], step_size=hyper["step_size"],
        num_steps=hyper["num_steps"], clip_min=hyper.get("clip_min"),
        clip_max=hyper.get("clip_max"))
  for k in ("lam", "gamma"):
    v = hyper.get(k)
    if k in needs and checks.is_concrete_number(v) and not v >= 0:
      raise ValueError(f"{k}={v!r} is not accepted; it must be >= 0.")
  if uses_ig:
    m, c = hyper.get("m", 50), hyper.get("approx_factor", 1)
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
      raise ValueError(f"m={m!r} is not accepted; it must be an int >= 1.")
    if (isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1
        or m % c):
      raise ValueError(
          f"approx_factor={c!r} is not accepted with m={m}; it must be an int "
          f">= 1 that divides m (divisors of {m}: "
          f"{[d for d in range(1, m + 1) if m % d == 0]}).")
  reduction = hyper.get("reduction", "sum")
  if reduction not in REDUCTIONS:
    raise ValueError(
        f"Unknown reduction {reduction!r}; accepted: {', '.join(REDUCTIONS)}.")


def _attack_kwargs(hyper):
  return dict(epsilon=hyper["epsilon"], step_size=hyper["step_size"],
              num_steps=hyper["num_steps"],
              clip_min=hyper.get("clip_min", 0.0),
              clip_max=hyper.get("clip_max", 1.0))


def _defaults(hyper):
  out = dict(m=50, approx_factor=1, clip_min=0.0, clip_max=1.0,
             reduction="sum")
  out.update(hyper)
  return out


def _loss_ig(apply_fn, params, inputs, labels, adv_inputs, num_steps,
             inner=False):
  """IG of the loss along the path from the natural inputs to `adv_inputs`.

  `IG(x, x') = (x' - x) * (1/n) sum_{k=1..n} grad l_y(x + (k/n)(x' - x))`,
  differentiable in `params` (the outer loss: IG's default chunks, a
  `lax.scan` on CPU) and in `adv_inputs` (the inner maximisation,
  `inner=True`: `attribution.unrolled_chunk_size`'s chunks, unrolled, which
  on CPU ran PGD 0.64-0.72x as long; BUILD.md, Performance, item 8).
  """
  loss_y = lambda z: cross_entropy(apply_fn(params, z), labels)
  kw = {}
  if inner:
    kw = dict(chunk_size=unrolled_chunk_size(np.shape(adv_inputs)[0],
                                             num_steps),
              unroll_chunks=True)
  return integrated_gradients(loss_y, adv_inputs, baselines=inputs,
                              num_steps=num_steps, method="riemann_right",
                              **kw)


def _aux(ce, adv_ce, reg, adv_inputs, logits):
  return dict(ce=ce, adv_ce=adv_ce, reg=reg, adv_inputs=adv_inputs,
              logits=logits)


def _constant(params):
  """The parameters held constant, for an inner maximisation.

  The attack's result is a constant of the outer loss (the attacks stop its
  gradient). Closing over live parameters, the attack's loop was still
  linearised in them by `jax.grad`, to tangents then dropped, and JAX's
  partial evaluation hoisted the loop's loop-invariant values (those not
  depending on the attack's iterate) out of it, to be carried through it.
  For IG-NORM on the MNIST CNN, XLA's optimised program carried 286 buffers
  of 521 MiB through the PGD loop; with the parameters constant, 70 of 12.7
  MiB, and the training step took 0.74-0.92x as long on the 2-core CPU of
  `BUILD.md` ("Performance", item 10; peak memory was unchanged). There the
  values and gradients were the same, bit for bit.
  """
  return jax.lax.stop_gradient(params)


def natural(apply_fn, params, inputs, labels, *, key=None, **hyper):
  """NATURAL training: the clean cross-entropy `l(x, y)`.

  Args:
    apply_fn: `(params, x [N, *S]) -> logits [N, C]`.
    params: model parameters.
    inputs: `[N, *S]` inputs.
    labels: `[N]` int labels.
    key: unused (accepted for a uniform signature).
    **hyper: `HYPER_KEYS`; all unused.

  Returns:
    `(loss [N], aux)`.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019, (RAR-U)
    with lambda = 0.

  Example:
    >>> import jax.numpy as jnp
    >>> apply_fn = lambda p, x: x @ p
    >>> loss, aux = natural(apply_fn, jnp.eye(2), jnp.zeros((1, 2)),
    ...                     jnp.array([0]))
    >>> loss
    Array([0.6931472], dtype=float32)
  """
  del key
  check_hyper("natural", hyper)
  logits = apply_fn(params, inputs)
  ce = cross_entropy(logits, labels)
  return ce, _aux(ce, ce, jnp.zeros_like(ce), inputs, logits)


def madry(apply_fn, params, inputs, labels, *, key, **hyper):
  """Madry adversarial training: `max_{x' in N(x, eps)} l(x', y)` by PGD.

  Args:
    apply_fn: `(params, x [N, *S]) -> logits [N, C]`.
    params: model parameters.
    inputs: `[N, *S]` natural inputs.
    labels: `[N]` int labels.
    key: PRNG key for the PGD random start (None: start at the inputs).
    **hyper: uses `epsilon`, `step_size`, `num_steps`, `clip_min`, `clip_max`.

  Returns:
    `(loss [N], aux)` with `loss = CE(x*)`, x* the PGD point (a constant).

  References:
    Madry et al., ICLR 2018; Chen et al., NeurIPS 2019, (RAR-U) with
    s = sum and lambda = 1.

  Example:
    >>> import jax.numpy as jnp
    >>> apply_fn = lambda p, x: x @ p                 # linear, 2 classes
    >>> loss, aux = madry(apply_fn, jnp.eye(2), jnp.full((1, 2), 0.5),
    ...                   jnp.array([0]), key=None, epsilon=0.1,
    ...                   step_size=0.1, num_steps=1)
    >>> aux["adv_inputs"]                             # away from class 0
    Array([[0.4, 0.6]], dtype=float32)
    >>> loss                                          # log(1 + e^0.2)
    Array([0.79813886], dtype=float32)
  """
  check_hyper("madry", hyper)
  hyper = _defaults(hyper)
  ce_fn = lambda p, x: cross_entropy(apply_fn(p, x), labels)
  adv = pgd_lib.pgd(functools.partial(ce_fn, _constant(params)), inputs,
                    key=key, **_attack_kwargs(hyper))
  logits = apply_fn(params, inputs)
  ce = cross_entropy(logits, labels)
  adv_ce = ce_fn(params, adv)
  return adv_ce, _aux(ce, adv_ce, jnp.zeros_like(ce), adv, logits)


def trades(apply_fn, params, inputs, labels, *, key, **hyper):
  """TRADES: `CE(x) + lam * KL(p(x) || p(x'))`, x' from PGD on the KL.

  Args:
    apply_fn: `(params, x [N, *S]) -> logits [N, C]`.
    params: model parameters.
    inputs: `[N, *S]` natural inputs.
    labels: `[N]` int labels.
    key: PRNG key for the PGD random start.
    **hyper: uses `epsilon`, `step_size`, `num_steps`, `lam` (beta of TRADES),
      `clip_min`, `clip_max`.

  Returns:
    `(loss [N], aux)`; `aux["reg"]` is the KL term.

  References:
    Zhang et al., "Theoretically Principled Trade-off between Robustness and
    Accuracy", ICML 2019.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> apply_fn = lambda p, x: x @ p                 # linear, 2 classes
    >>> loss, aux = trades(apply_fn, jnp.eye(2), jnp.full((2, 2), 0.5),
    ...                    jnp.array([0, 1]), key=jax.random.key(0),
    ...                    epsilon=0.1, step_size=0.05, num_steps=2, lam=6.0)
    >>> bool(jnp.allclose(loss, aux["ce"] + 6.0 * aux["reg"]))
    True
  """
  check_hyper("trades", hyper)
  hyper = _defaults(hyper)
  logits = apply_fn(params, inputs)
  log_p_clean = jax.nn.log_softmax(logits)

  def kl(p, log_p, x):
    log_q = jax.nn.log_softmax(apply_fn(p, x))
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)

  fixed = jax.lax.stop_gradient(log_p_clean)
  adv = pgd_lib.pgd(functools.partial(kl, _constant(params), fixed), inputs,
                    key=key, **_attack_kwargs(hyper))
  ce = cross_entropy(logits, labels)
  reg = kl(params, log_p_clean, adv)
  adv_ce = cross_entropy(apply_fn(params, adv), labels)
  return ce + hyper["lam"] * reg, _aux(ce, adv_ce, reg, adv, logits)


def ig_norm(apply_fn, params, inputs, labels, *, key, **hyper):
  """IG-NORM: `l(x, y) + lam * max_{x' in N(x, eps)} ||IG^{l_y}(x, x')||_1`.

  The inner maximum is found by PGD on `||IG_approx(x, x')||_1`, the IG over
  every `approx_factor`-th of the `m` right-Riemann points (i.e. `m /
  approx_factor` points), with gradients through both the `(x' - x)` factor
  and the path points. The outer loss uses all `m` points at the PGD point x*
  (held constant) and is differentiated through IG (double back-propagation).

  Args:
    apply_fn: `(params, x [N, *S]) -> logits [N, C]`.
    params: model parameters.
    inputs: `[N, *S]` natural inputs.
    labels: `[N]` int labels.
    key: PRNG key for the PGD random start.
    **hyper: uses `epsilon`, `step_size`, `num_steps`, `lam` (lambda), `m`
      (default 50), `approx_factor` (default 1), `clip_min`, `clip_max`.

  Returns:
    `(loss [N], aux)`; `aux["reg"]` is `||IG_m(x, x*)||_1`.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019, IG-NORM
    (training objective "ar", inner loss "ar_approx" in the original code).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> apply_fn = lambda p, x: x @ p                 # linear, 2 classes
    >>> loss, aux = ig_norm(apply_fn, jnp.eye(2), jnp.full((2, 2), 0.5),
    ...                     jnp.array([0, 1]), key=jax.random.key(0),
    ...                     epsilon=0.1, step_size=0.05, num_steps=2,
    ...                     lam=1.0, m=4, approx_factor=2)
    >>> loss.shape, bool(jnp.allclose(loss, aux["ce"] + aux["reg"]))
    ((2,), True)
  """
  check_hyper("ig_norm", hyper)
  hyper = _defaults(hyper)
  m, c = hyper["m"], hyper["approx_factor"]
  frozen = _constant(params)
  inner = lambda x_adv: _l1(_loss_ig(apply_fn, frozen, inputs, labels, x_adv,
                                     m // c, inner=True))
  adv = pgd_lib.pgd(inner, inputs, key=key, **_attack_kwargs(hyper))
  logits = apply_fn(params, inputs)
  ce = cross_entropy(logits, labels)
  reg = _l1(_loss_ig(apply_fn, params, inputs, labels, adv, m))
  adv_ce = cross_entropy(apply_fn(params, adv), labels)
  return ce + hyper["lam"] * reg, _aux(ce, adv_ce, reg, adv, logits)


def ig_sum_norm(apply_fn, params, inputs, labels, *, key, **hyper):
  """IG-SUM-NORM: `max_{x' in N(x, eps)} { l(x', y) + beta ||IG^{l_y}(x, x')||_1 }`.

  `lam` holds beta (as the original code's `lambda` key does). The inner
  problem maximises `CE(x') + beta ||IG_approx(x, x')||_1`; the outer loss is
  `CE(x*) + beta ||IG_m(x, x*)||_1` with x* held constant.

  Args:
    apply_fn: `(params, x [N, *S]) -> logits [N, C]`.
    params: model parameters.
    inputs: `[N, *S]` natural inputs.
    labels: `[N]` int labels.
    key: PRNG key for the PGD random start.
    **hyper: uses `epsilon`, `step_size`, `num_steps`, `lam` (beta), `m`
      (default 50), `approx_factor` (default 1), `clip_min`, `clip_max`.

  Returns:
    `(loss [N], aux)`; `aux["reg"]` is `||IG_m(x, x*)||_1`.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019,
    IG-SUM-NORM (training objective "adv_ar", inner loss "adv_ar_approx").

  Example:
    >>> import jax, jax.numpy as jnp
    >>> apply_fn = lambda p, x: x @ p                 # linear, 2 classes
    >>> loss, aux = ig_sum_norm(apply_fn, jnp.eye(2), jnp.full((2, 2), 0.5),
    ...                         jnp.array([0, 1]), key=jax.random.key(0),
    ...                         epsilon=0.1, step_size=0.05, num_steps=2,
    ...                         lam=0.5, m=4, approx_factor=2)
    >>> bool(jnp.allclose(loss, aux["adv_ce"] + 0.5 * aux["reg"]))
    True
  """
  check_hyper("ig_sum_norm", hyper)
  hyper = _defaults(hyper)
  m, c, beta = hyper["m"], hyper["approx_factor"], hyper["lam"]
  ce_fn = lambda p, x: cross_entropy(apply_fn(p, x), labels)
  frozen = _constant(params)

  def inner(x_adv):
    ig = _loss_ig(apply_fn, frozen, inputs, labels, x_adv, m // c, inner=True)
    return ce_fn(frozen, x_adv) + beta * _l1(ig)

  adv = pgd_lib.pgd(inner, inputs, key=key, **_attack_kwargs(hyper))
  logits = apply_fn(params, inputs)
  ce = cross_entropy(logits, labels)
  adv_ce = ce_fn(params, adv)
  reg = _l1(_loss_ig(apply_fn, params, inputs, labels, adv, m))
  return adv_ce + beta * reg, _aux(ce, adv_ce, reg, adv, logits)


def ig_wasserstein(apply_fn, params, inputs, labels, *, key, **hyper):
  """Distributional (Wasserstein) robust attribution, penalised form.

  `l(x, y) + lam * sup_{x'} { ||IG^{l_y}(x, x')||_1 - gamma ||x' - x||_2^2 }`
  (spec RAR-D with fixed gamma, transport cost `||x - x'||^2` within a class).
  The supremum is approximated by `num_steps` proximal gradient-ascent steps
  of size `step_size` without a ball (as Sinha, Namkoong and Duchi's WRM inner
  loop, with the quadratic penalty applied by its exact proximal step, stable
  for any `gamma`), from a uniform random start of radius `epsilon` (needed:
  at `x' = x` the objective has a zero gradient), kept in the pixel box. Inner IG uses `m /
  approx_factor` points, the outer `m`.

  Args:
    apply_fn: `(params, x [N, *S]) -> logits [N, C]`.
    params: model parameters.
    inputs: `[N, *S]` natural inputs.
    labels: `[N]` int labels.
    key: PRNG key for the random start (required).
    **hyper: uses `epsilon` (random-start radius), `step_size`, `num_steps`,
      `lam`, `gamma`, `m`, `approx_factor`, `clip_min`, `clip_max`.

  Returns:
    `(loss [N], aux)`; `aux["reg"]` is the penalised inner value at x*.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019
    (distributional robustness model); Sinha, Namkoong, Duchi, "Certifying
    Some Distributional Robustness with Principled Adversarial Training",
    ICLR 2018.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> apply_fn = lambda p, x: x @ p                 # linear, 2 classes
    >>> loss, aux = ig_wasserstein(
    ...     apply_fn, jnp.eye(2), jnp.full((2, 2), 0.5), jnp.array([0, 1]),
    ...     key=jax.random.key(0), epsilon=0.1, step_size=0.05, num_steps=2,
    ...     lam=1.0, gamma=1.0, m=4, approx_factor=2)
    >>> loss.shape, bool(jnp.allclose(loss, aux["ce"] + aux["reg"]))
    ((2,), True)
  """
  check_hyper("ig_wasserstein", hyper)
  if key is None:
    raise ValueError("ig_wasserstein needs a PRNG key for its random start; "
                     "got key=None.")
  hyper = _defaults(hyper)
  m, c, gamma = hyper["m"], hyper["approx_factor"], hyper["gamma"]
  clip = lambda x: pgd_lib._clip_box(x, hyper["clip_min"], hyper["clip_max"])

  def penalised(x_adv, num_points):
    ig = _loss_ig(apply_fn, params, inputs, labels, x_adv, num_points)
    return _l1(ig) - gamma * _l1((x_adv - inputs) ** 2)

  # Proximal gradient ascent: an explicit step on the IG norm, then the exact
  # proximal step of the quadratic penalty, which shrinks the displacement by
  # 1 / (1 + 2 gamma a). Plain gradient ascent diverges once gamma * a >= 1.
  frozen = _constant(params)
  ig_grad = jax.grad(lambda x: jnp.sum(_l1(_loss_ig(
      apply_fn, frozen, inputs, labels, x, m // c, inner=True))))
  step_size = hyper["step_size"]
  shrink = 1.0 / (1.0 + 2.0 * gamma * step_size)

  def step(_, x):
    return clip(inputs + shrink * (x - inputs + step_size * ig_grad(x)))

  x0 = clip(pgd_lib.random_start(key, inputs, epsilon=hyper["epsilon"]))
  adv = jax.lax.fori_loop(0, hyper["num_steps"], step, x0)
  adv = jax.lax.stop_gradient(adv)
  logits = apply_fn(params, inputs)
  ce = cross_entropy(logits, labels)
  reg = penalised(adv, m)
  adv_ce = cross_entropy(apply_fn(params, adv), labels)
  return ce + hyper["lam"] * reg, _aux(ce, adv_ce, reg, adv, logits)


OBJECTIVES: dict[str, Callable[..., tuple[Array, dict[str, Any]]]] = {
    "natural": natural,
    "madry": madry,
    "trades": trades,
    "ig_norm": ig_norm,
    "ig_sum_norm": ig_sum_norm,
    "ig_wasserstein": ig_wasserstein,
}


def get_objective(name: str):
  """The objective function called `name`; a clear error for unknown names.

  Args:
    name: a name in `OBJECTIVES`.

  Returns:
    The objective, `(apply_fn, params, inputs [N, *S], labels [N], *, key,
    **hyper) -> (loss [N], aux)`.

  Raises:
    ValueError: an unknown name (the message lists the accepted ones).

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (the
    methods of Table 1).

  Example:
    >>> get_objective("ig_norm") is ig_norm
    True
    >>> get_objective("ig")
    Traceback (most recent call last):
      ...
    ValueError: Unknown objective 'ig'; accepted: natural, madry, trades,
    ig_norm, ig_sum_norm, ig_wasserstein.
  """
  try:
    return OBJECTIVES[name]
  except (KeyError, TypeError):
    raise ValueError(
        f"Unknown objective {name!r}; accepted: {', '.join(OBJECTIVES)}."
    ) from None


def reduce_loss(per_example: Array, reduction: str = "sum") -> Array:
  """`sum` (the original code) or `mean` (the paper's formulas) over the batch.

  Args:
    per_example: `[N]` per-example losses.
    reduction: one of `REDUCTIONS`.

  Returns:
    The scalar loss.

  Raises:
    ValueError: an unknown `reduction`.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (batch
    sums of its code vs. means of its formulas; spec section 3.1).

  Example:
    >>> import jax.numpy as jnp
    >>> reduce_loss(jnp.array([1.0, 3.0]), "mean")
    Array(2., dtype=float32)
  """
  if reduction == "sum":
    return jnp.sum(per_example)
  if reduction == "mean":
    return jnp.mean(per_example)
  raise ValueError(
      f"Unknown reduction {reduction!r}; accepted: {', '.join(REDUCTIONS)}.")


def loss(objective, apply_fn, params, inputs, labels, *, key=None, **hyper):
  """The scalar training loss of an objective (by name or function) and aux.

  Args:
    objective: a name in `OBJECTIVES` or an objective function.
    apply_fn: `(params, x [N, *S]) -> logits [N, C]`.
    params: model parameters (differentiate with respect to these).
    inputs: `[N, *S]` natural inputs.
    labels: `[N]` int labels.
    key: PRNG key for the inner maximisation's random start.
    **hyper: `HYPER_KEYS`; `reduction` (`"sum"`, default, or `"mean"`)
      reduces the per-example losses.

  Returns:
    `(scalar loss, aux)`; `aux` also holds the per-example `loss [N]`.

  Raises:
    ValueError: an unknown objective or reduction, or a bad hyper-parameter.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (the
    training objectives, spec section 3.1).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> apply_fn = lambda p, x: x @ p
    >>> total, aux = loss("ig_norm", apply_fn, jnp.eye(2), jnp.ones((3, 2)),
    ...                   jnp.array([0, 1, 0]), key=jax.random.key(0),
    ...                   epsilon=0.1, step_size=0.02, num_steps=5, lam=1.0,
    ...                   m=10, approx_factor=5, reduction="mean")
    >>> total.shape, aux["loss"].shape
    ((), (3,))
  """
  fn = get_objective(objective) if isinstance(objective, str) else objective
  checks.check_finite("inputs", inputs)
  if checks.host_value(inputs) is not None:
    logits = jax.eval_shape(apply_fn, params, inputs)
    checks.check_labels(labels, num_examples=np.shape(inputs)[0],
                        num_classes=logits.shape[-1])
  per_example, aux = fn(apply_fn, params, inputs, labels, key=key, **hyper)
  aux = dict(aux, loss=per_example)
  return reduce_loss(per_example, hyper.get("reduction", "sum")), aux


__all__ = [
    "OBJECTIVES", "HYPER_KEYS", "REDUCTIONS", "cross_entropy", "natural",
    "madry", "trades", "ig_norm", "ig_sum_norm", "ig_wasserstein",
    "get_objective", "check_hyper", "reduce_loss", "loss",
]

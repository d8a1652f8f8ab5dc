"""Attributions as differentiable pure functions.

`integrated_gradients(f, inputs, baselines)` explains a per-example scalar
function `f: [N, *S] -> [N]` (a logit, a log-probability, a loss) by the path
integral of its gradient from `baselines` to `inputs`. The path points are a
`jax.vmap`, optionally evaluated in chunks to bound memory, and the result can
be differentiated again (with respect to model parameters for the training
regulariser, or to `inputs`/`baselines` for the attacks).

Also: `gradient_saliency` (the plain input gradient), `smoothgrad` (noise
averaging around any attribution function) and `saliency_map` (the paper's
evaluation map: absolute values summed over channels, rescaled to sum to H*W).

`f` must be per-example: output `i` may depend on input `i` only (no batch
statistics), because the gradient of `sum(f(z))` is taken as the per-example
gradient.

Example:
  >>> import jax.numpy as jnp
  >>> from rar_jax import attribution
  >>> w = jnp.array([1.0, -2.0, 3.0])
  >>> f = lambda x: x @ w                     # [N, 3] -> [N]
  >>> attribution.integrated_gradients(f, jnp.ones((2, 3)))
  Array([[ 1., -2.,  3.],
         [ 1., -2.,  3.]], dtype=float32)
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rar_jax import checks
from rar_jax import vma

Array = jax.Array

METHODS = ("riemann_right", "riemann_left", "riemann_middle",
           "riemann_trapezoid", "gauss_legendre")

# `chunk_size="auto"` on CPU: path points per chunk ~ this many images per
# gradient evaluation. XLA:CPU runs the MNIST CNN's gradient fastest on
# batches of about 64 (cache-sized activations): IG with 100 points at batch
# 64 was 1.3x faster in chunks of one point than as one vmap of 6,400 images,
# and the gradient of an IG norm (training) 7.7x (BUILD.md, "Performance").
CPU_IMAGES_PER_CHUNK = 64
# An IG differentiated in its inputs (the objectives' inner maximisations, the
# attribution attack) traces at most this many chunks one after another on
# CPU (`unrolled_chunk_size`); each costs compile time (0.2-0.4 s for the
# MNIST CNN). Measured with 5-20 chunks (BUILD.md, Performance, item 8).
MAX_UNROLLED_CHUNKS = 20


def _rule(method, num_steps):
  """`(alphas, raw_weights, denominator)` of a rule; weights = raw / denom.

  Uniform rules keep raw weights of exactly 1 (0.5 at trapezoid ends) and
  divide once at the end, so that e.g. IG of a linear function is exact in
  float32 at any step count.
  """
  if method not in METHODS:
    raise ValueError(
        f"Unknown IG method {method!r}; accepted: {', '.join(METHODS)}.")
  if (isinstance(num_steps, bool)
      or not isinstance(num_steps, (int, np.integer)) or num_steps < 1):
    raise ValueError(
        f"num_steps={num_steps!r} is not accepted; it must be an int >= 1.")
  m = int(num_steps)
  k = np.arange(1, m + 1, dtype=np.float64)
  raw, denom = np.ones(m), float(m)
  if method == "riemann_right":
    alphas = k / m
  elif method == "riemann_left":
    alphas = (k - 1) / m
  elif method == "riemann_middle":
    alphas = (k - 0.5) / m
  elif method == "riemann_trapezoid":
    if m < 2:
      raise ValueError(
          f"num_steps={m} is too small for riemann_trapezoid, which evaluates "
          "both end points; accepted: num_steps >= 2.")
    alphas = np.linspace(0.0, 1.0, m)
    raw[0] = raw[-1] = 0.5
    denom = float(m - 1)
  else:  # gauss_legendre
    nodes, w = np.polynomial.legendre.leggauss(m)
    alphas, raw, denom = (nodes + 1.0) / 2.0, w / 2.0, 1.0
  return alphas, raw, denom


def path_points(method: str, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Quadrature nodes `alphas` in [0, 1] and weights of a rule on [0, 1].

  `integral_0^1 g(a) da ~= sum_k weights[k] * g(alphas[k])`, with `num_steps`
  evaluations of `g` for every rule.

  - `riemann_right`: `alphas = k/m, k = 1..m`, weights `1/m` (the paper's and
    the original code's rule; `alpha = 0` excluded, `alpha = 1` included).
  - `riemann_left`: `(k-1)/m`; `riemann_middle`: `(k-1/2)/m`.
  - `riemann_trapezoid`: `m` equally spaced points from 0 to 1 inclusive, the
    end points with half weight (needs `m >= 2`).
  - `gauss_legendre`: the `m`-point Gauss-Legendre rule mapped to [0, 1];
    exact for polynomials of degree `2m - 1`.

  Args:
    method: one of `METHODS`.
    num_steps: number of points `m >= 1` (`>= 2` for the trapezoid).

  Returns:
    `(alphas, weights)`, two float32 numpy arrays of shape `[m]`; the weights
    sum to 1.

  Raises:
    ValueError: unknown `method` or a bad `num_steps`.

  References:
    Sundararajan, Taly, Yan, "Axiomatic Attribution for Deep Networks",
    ICML 2017 (the Riemann approximation of IG); Chen et al., "Robust
    Attribution Regularization", NeurIPS 2019 (the right rule of its code).

  Example:
    >>> path_points("riemann_right", 4)[0]
    array([0.25, 0.5 , 0.75, 1.  ], dtype=float32)
  """
  alphas, raw, denom = _rule(method, num_steps)
  return alphas.astype(np.float32), (raw / denom).astype(np.float32)


def auto_chunk_size(batch_size: int, num_steps: int,
                    platform: Optional[str] = None) -> Optional[int]:
  """The chunk size `chunk_size="auto"` picks: by device platform.

  GPU/TPU: None (all path points in one vmap: the most parallel work).
  CPU: the largest divisor of `num_steps` that is at most
  `max(1, CPU_IMAGES_PER_CHUNK // batch_size)` (None when that is all the
  points): XLA:CPU is fastest on cache-sized batches, a `lax.scan` over
  chunks bounds memory as well, and equal chunks compile one loop body and
  no remainder.

  Args:
    batch_size: examples per call, `N`.
    num_steps: path points `m`.
    platform: "cpu", "gpu", "tpu", ...; None: `jax.default_backend()`.

  Returns:
    An int chunk size `< num_steps`, or None for all points at once.

  References:
    `BUILD.md`, "Performance" (the measurements behind the rule).

  Example:
    >>> auto_chunk_size(64, 100, "cpu"), auto_chunk_size(4, 100, "cpu")
    (1, 10)
    >>> auto_chunk_size(64, 100, "gpu") is None
    True
  """
  platform = platform or jax.default_backend()
  if platform != "cpu":
    return None
  limit = max(1, CPU_IMAGES_PER_CHUNK // max(1, int(batch_size)))
  if limit >= num_steps:
    return None
  return max(d for d in range(1, limit + 1) if num_steps % d == 0)


def unrolled_chunk_size(batch_size: int, num_steps: int,
                        platform: Optional[str] = None) -> Optional[int]:
  """Chunks for an IG that is differentiated in its inputs, to be unrolled.

  `auto_chunk_size`'s chunks, made coarser where needed so that there are at
  most `MAX_UNROLLED_CHUNKS` of them (the last one may be smaller); pass the
  result with `unroll_chunks=True`. On CPU, with IG differentiated in the
  inputs, unrolled chunks ran PGD on an IG norm 0.64-0.72x as long as a
  `lax.scan` over the same chunks (one input gradient alone: 0.80-0.94x),
  and PGD and the attribution attack 0.80-0.90x as long as all points at
  once. GPU/TPU: None, as `auto_chunk_size`.

  Args:
    batch_size: examples per call, `N`.
    num_steps: path points `m`.
    platform: "cpu", "gpu", "tpu", ...; None: `jax.default_backend()`.

  Returns:
    An int chunk size `< num_steps`, at least `num_steps /
    MAX_UNROLLED_CHUNKS`, or None for all points at once.

  References:
    `BUILD.md`, "Performance", item 8 (the measurements behind the rule).

  Example:
    >>> unrolled_chunk_size(50, 10, "cpu"), unrolled_chunk_size(50, 100, "cpu")
    (1, 5)
    >>> unrolled_chunk_size(50, 10, "gpu") is None
    True
  """
  chunk = auto_chunk_size(batch_size, num_steps, platform)
  if chunk is None:
    return None
  chunk = max(chunk, -(-num_steps // MAX_UNROLLED_CHUNKS))
  return None if chunk >= num_steps else chunk


def _check_per_example_fn(f, inputs, name="f"):
  out = jax.eval_shape(f, jax.ShapeDtypeStruct(np.shape(inputs),
                                               jnp.result_type(inputs)))
  n = np.shape(inputs)[0]
  if not hasattr(out, "shape") or tuple(out.shape) != (n,):
    got = getattr(out, "shape", type(out).__name__)
    raise ValueError(
        f"{name} must map inputs of shape [N, ...] = {tuple(np.shape(inputs))} to "
        f"per-example scalars of shape [N] = ({n},); it returned shape {got}. "
        "Select one output per example, e.g. the logit of the label.")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise ValueError(
        f"{name} must return floating-point values to be differentiated; it "
        f"returned dtype {out.dtype}.")


def _check_inputs(inputs):
  """Checks shape, dtype and (when concrete) values; compiles nothing."""
  if np.ndim(inputs) < 1:
    raise ValueError(
        f"inputs must have a leading batch axis, shape [N, ...]; got shape "
        f"{tuple(np.shape(inputs))}.")
  dtype = jnp.result_type(inputs)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"inputs must be floating point to be differentiated; got dtype "
        f"{dtype}. Convert images with inputs.astype(jnp.float32).")
  checks.check_finite("inputs", inputs)


def integrated_gradients(
    f: Callable[[Array], Array],
    inputs: Array,
    baselines: Optional[Array] = None,
    *,
    num_steps: int = 50,
    method: str = "riemann_right",
    chunk_size: Optional[int] | str = "auto",
    unroll_chunks: bool = False,
    return_delta: bool = False,
):
  """Integrated Gradients of a per-example scalar function.

  `IG_i = (x_i - b_i) * integral_0^1 d f(b + a (x - b)) / d x_i  da`, with the
  integral replaced by the quadrature rule `method` over `num_steps` points.
  With `riemann_right` this is exactly the paper's formula,
  `(x - b) * (1/m) sum_{k=1..m} grad f(b + (k/m)(x - b))`.

  The gradients at the path points are computed by a `jax.vmap` over the
  points. With `chunk_size`, at most `chunk_size` points are evaluated at once
  (a `lax.scan` over chunks that accumulates the weighted sum), so memory no
  longer grows with `num_steps`; the result equals the unchunked one up to
  float rounding of the summation order. The default, "auto", chooses by
  device (`auto_chunk_size`): all points at once on GPU/TPU, chunks of about
  `CPU_IMAGES_PER_CHUNK` images on CPU (equal chunks), where that is fastest.

  With `unroll_chunks=True` the chunks are traced one after another (a Python
  loop, no `lax.scan`): the program grows, and compiles slower, with the
  number of chunks, but a differentiated IG then keeps each chunk's residuals
  apart instead of stacking them in the scan's buffers, and XLA:CPU can run
  independent chunks' ops side by side. On CPU that made PGD on the IG norm
  (the training objectives' inner maximisation, a gradient in the inputs)
  0.64-0.72x as long, and gradients in the parameters 1.16-1.37x as long
  (`unrolled_chunk_size` gives the chunks for the former). The sums are the
  same, in the same order; the values agree up to float rounding.

  Nothing is stopped: the result can be differentiated with respect to the
  parameters `f` closes over, to `inputs` and to `baselines` (this is the
  double back-propagation of the training objectives).

  Args:
    f: per-example scalar function, `[N, *S] -> [N]`. Output `i` must depend on
      input `i` only.
    inputs: `[N, *S]` points to explain (float).
    baselines: broadcastable to `inputs.shape`; default zeros. A different
      baseline per example is allowed, e.g. the natural input when attributing
      the loss change from `x` to an adversarial `x'` as the paper does.
    num_steps: number of path points `m` (gradient evaluations).
    method: quadrature rule, one of `METHODS` (see `path_points`).
    chunk_size: evaluate at most this many path points at once; None: all
      at once; "auto" (default): `auto_chunk_size(N, num_steps)`.
    unroll_chunks: trace the chunks one after another instead of in a
      `lax.scan` (no effect without chunks).
    return_delta: also return the completeness gap per example.

  Returns:
    `[N, *S]` attributions; with `return_delta=True` the pair
    `(attributions, delta)` where `delta [N] = sum(IG) - (f(x) - f(baseline))`.

  Raises:
    ValueError: a baseline that does not broadcast to `inputs`, `num_steps <
      1`, an unknown `method`, a bad `chunk_size` or `unroll_chunks`, or an
      `f` that does not return `[N]` floats.

  References:
    Sundararajan, Taly, Yan, "Axiomatic Attribution for Deep Networks",
    ICML 2017; Chen et al., "Robust Attribution Regularization", NeurIPS 2019.

  Example:
    >>> import jax.numpy as jnp
    >>> f = lambda x: jnp.sum(x ** 2, axis=-1)          # [N, 2] -> [N]
    >>> ig, delta = integrated_gradients(
    ...     f, jnp.array([[1.0, 2.0]]), num_steps=4, method="gauss_legendre",
    ...     return_delta=True)
    >>> ig, abs(float(delta[0])) < 1e-6
    (Array([[1., 4.]], dtype=float32), True)
  """
  _check_inputs(inputs)
  shape = tuple(np.shape(inputs))
  if baselines is not None:
    try:
      broadcast = np.broadcast_shapes(np.shape(baselines), shape)
    except ValueError:
      broadcast = None
    if broadcast != shape:
      raise ValueError(
          f"baselines of shape {tuple(np.shape(baselines))} do not broadcast "
          f"to inputs of shape {shape}; accepted: any shape that broadcasts "
          "to the inputs (e.g. one baseline [*S] or one per example [N, *S]).")
    checks.check_finite("baselines", baselines)
  alphas, weights, denom = _rule(method, num_steps)
  if isinstance(chunk_size, str) and chunk_size == "auto":
    chunk_size = auto_chunk_size(shape[0], len(alphas))
  elif chunk_size is not None and (
      isinstance(chunk_size, (bool, str))
      or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
    raise ValueError(
        f"chunk_size={chunk_size!r} is not accepted; it must be None (all "
        "points at once), 'auto' or an int >= 1.")
  if not isinstance(unroll_chunks, (bool, np.bool_)):
    raise ValueError(
        f"unroll_chunks={unroll_chunks!r} is not accepted; it must be a bool.")
  _check_per_example_fn(f, inputs)
  inputs = jnp.asarray(inputs)
  if baselines is None:
    baselines = jnp.zeros_like(inputs)
  else:
    baselines = jnp.broadcast_to(
        jnp.asarray(baselines, dtype=inputs.dtype), inputs.shape)
  # Nodes in the inputs' precision (float64 under jax_enable_x64).
  alphas, weights = alphas.astype(inputs.dtype), weights.astype(inputs.dtype)

  grad_fn = jax.grad(lambda z: jnp.sum(f(z)))
  diff = inputs - baselines

  def weighted_grads(alpha_chunk, weight_chunk):
    # [c] path points -> sum_k raw_k grad f(b + a_k (x - b)), shape [N, *S].
    grads = jax.vmap(lambda a: grad_fn(baselines + a * diff))(alpha_chunk)
    return jnp.tensordot(weight_chunk, grads, axes=1)

  def nodes(values):
    # The nodes and weights as arrays. Under `jax.shard_map` they vary like
    # the inputs before they enter the scan: cast inside its body, they were
    # stacked by the backward pass as values per iteration, where XLA
    # otherwise folds the constant weights (the IG-NORM step then took 1.12x
    # as long as under pmap on one CPU device; `rar_jax.vma`, BUILD.md).
    return vma.varying_like(jnp.asarray(values), inputs)

  m = alphas.shape[0]
  if chunk_size is None or chunk_size >= m:
    sum_grads = weighted_grads(nodes(alphas), nodes(weights))
  else:
    num_full = m // chunk_size
    split = num_full * chunk_size
    a_full = alphas[:split].reshape(num_full, chunk_size)
    w_full = weights[:split].reshape(num_full, chunk_size)

    if unroll_chunks:
      sum_grads = jnp.zeros_like(inputs)
      for a_chunk, w_chunk in zip(a_full, w_full):
        sum_grads = sum_grads + weighted_grads(nodes(a_chunk),
                                               nodes(w_chunk))
    else:
      def body(acc, aw):
        return acc + weighted_grads(*aw), None

      sum_grads, _ = jax.lax.scan(
          body, jnp.zeros_like(inputs), (nodes(a_full), nodes(w_full)))
    if split < m:
      sum_grads = sum_grads + weighted_grads(nodes(alphas[split:]),
                                             nodes(weights[split:]))
  attributions = diff * (sum_grads / denom)
  if not return_delta:
    return attributions
  axes = tuple(range(1, inputs.ndim))
  delta = jnp.sum(attributions, axis=axes) - (f(inputs) - f(baselines))
  return attributions, delta


def gradient_saliency(f: Callable[[Array], Array], inputs: Array) -> Array:
  """The plain input gradient ("simple gradient") of a per-example scalar `f`.

  Args:
    f: per-example scalar function, `[N, *S] -> [N]`.
    inputs: `[N, *S]` float inputs.

  Returns:
    `[N, *S]` gradients `d f(x)_i / d x_i`.

  References:
    Simonyan, Vedaldi, Zisserman, "Deep Inside Convolutional Networks",
    ICLR 2014 workshop.

  Example:
    >>> import jax.numpy as jnp
    >>> gradient_saliency(lambda x: jnp.sum(x ** 2, axis=-1),
    ...                   jnp.array([[1.0, 2.0]]))
    Array([[2., 4.]], dtype=float32)
  """
  _check_inputs(inputs)
  inputs = jnp.asarray(inputs)
  _check_per_example_fn(f, inputs)
  return jax.grad(lambda z: jnp.sum(f(z)))(inputs)


def smoothgrad(
    attribution_fn: Callable[[Array], Array],
    inputs: Array,
    *,
    key: Array,
    num_samples: int = 50,
    noise_level: float = 0.15,
    squared: bool = False,
    chunk_size: Optional[int] = None,
) -> Array:
  """SmoothGrad: the average of an attribution over noisy copies of the input.

  Each example gets Gaussian noise of standard deviation
  `noise_level * (max(x) - min(x))` (its own value range), as in Smilkov et
  al.; `attribution_fn` is applied to every noisy batch and the results are
  averaged (squared first with `squared=True`, "SmoothGrad-Squared").

  Args:
    attribution_fn: `[N, *S] -> [N, *S]`, e.g.
      `functools.partial(integrated_gradients, f, num_steps=20)` or
      `lambda x: gradient_saliency(f, x)`.
    inputs: `[N, *S]` float inputs.
    key: PRNG key for the noise.
    num_samples: number of noisy copies (>= 1).
    noise_level: noise standard deviation relative to each example's range.
    squared: average the squared attributions.
    chunk_size: evaluate at most this many noisy copies at once (None: all).

  Returns:
    `[N, *S]` averaged attributions.

  References:
    Smilkov et al., "SmoothGrad: removing noise by adding noise", 2017.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> f = lambda x: jnp.sum(3.0 * x, axis=-1)   # linear: noise changes nothing
    >>> smoothgrad(lambda x: gradient_saliency(f, x), jnp.ones((1, 2)),
    ...            key=jax.random.key(0), num_samples=4)
    Array([[3., 3.]], dtype=float32)
  """
  _check_inputs(inputs)
  inputs = jnp.asarray(inputs)
  if (isinstance(num_samples, bool)
      or not isinstance(num_samples, (int, np.integer)) or num_samples < 1):
    raise ValueError(
        f"num_samples={num_samples!r} is not accepted; it must be an int >= 1.")
  if not noise_level >= 0:
    raise ValueError(
        f"noise_level={noise_level!r} is not accepted; it must be >= 0.")
  axes = tuple(range(1, inputs.ndim))
  spread = (jnp.max(inputs, axis=axes, keepdims=True)
            - jnp.min(inputs, axis=axes, keepdims=True))
  keys = jax.random.split(key, num_samples)

  def one(k):
    noise = jax.random.normal(k, inputs.shape, inputs.dtype)
    out = attribution_fn(inputs + noise_level * spread * noise)
    return out * out if squared else out

  outs = jax.lax.map(one, keys, batch_size=chunk_size or num_samples)
  return jnp.mean(outs, axis=0)


def saliency_map(attributions: Array) -> Array:
  """The paper's evaluation saliency map from attributions.

  `S = sum over channels of |attributions|`, rescaled so that each map sums to
  `H * W`. An all-zero attribution gives an all-zero map (there is no salient
  pixel to rescale).

  Args:
    attributions: `[N, H, W, C]` (channels last) or `[N, H, W]`.

  Returns:
    `[N, H, W]` non-negative maps, each summing to `H * W` (or all zero).

  Raises:
    ValueError: attributions that are not 3-D or 4-D.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (the
    evaluation code's `create_ig_saliency_ops`); Ghorbani, Abid, Zou,
    "Interpretation of Neural Networks is Fragile", AAAI 2019.

  Example:
    >>> import jax.numpy as jnp
    >>> saliency_map(jnp.array([[[1.0, -3.0], [0.0, 0.0]]]))
    Array([[[1., 3.],
            [0., 0.]]], dtype=float32)
  """
  attributions = jnp.asarray(attributions)
  if attributions.ndim == 4:
    s = jnp.sum(jnp.abs(attributions), axis=-1)
  elif attributions.ndim == 3:
    s = jnp.abs(attributions)
  else:
    raise ValueError(
        f"attributions of shape {tuple(attributions.shape)} are not accepted; "
        "accepted: [N, H, W, C] (channels last) or [N, H, W].")
  h, w = s.shape[1:]
  total = jnp.sum(s, axis=(1, 2), keepdims=True)
  safe = jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, (h * w) * s / safe, 0.0)


__all__ = [
    "METHODS", "CPU_IMAGES_PER_CHUNK", "MAX_UNROLLED_CHUNKS", "auto_chunk_size",
    "unrolled_chunk_size", "path_points",
    "integrated_gradients", "gradient_saliency",
    "smoothgrad", "saliency_map",
]

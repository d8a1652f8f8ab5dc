"""Metrics that compare attribution maps, and per-example accuracy.

Every function is pure, works under `jax.jit`, `vmap` and `pmap`, takes a
batch (batch axis first) and returns one value per example, `[N]` float32; the
caller reduces (sums, counts, averages over the correctly classified examples).

* `topk_intersection(a, b, k=...)`: fraction of shared top-k pixels.
* `kendall_tau(a, b)`: Kendall's tau-b, as `scipy.stats.kendalltau`, ties
  included, in O(D log^2 D) time and O(D) memory per example.
* `spearman_rho(a, b)`: Spearman's rho with average ranks, as
  `scipy.stats.spearmanr`.
* `mass_center_shift(a, b)`: distance between the centres of mass of two
  `[N, H, W]` maps.
* `accuracy(logits, labels)`: 1.0 / 0.0 per example.

Saliency maps may be `[N, D]`, `[N, H, W]` or any `[N, ...]`; they are
flattened per example. Bind options with `functools.partial` before `jit`:

  intersection_fn = jax.jit(functools.partial(topk_intersection, k=100))
  values = intersection_fn(saliency, attacked_saliency)   # [N]

References:
  Chen, Wu, Rastogi, Liang, Jha, "Robust Attribution Regularization",
  NeurIPS 2019 (evaluation protocol); Ghorbani, Abid, Zou, "Interpretation of
  Neural Networks is Fragile", AAAI 2019 (the metrics).
"""
import math
import operator

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from rar_jax import checks

# Largest map for which every pair count, D * (D - 1) / 2, fits in int32.
MAX_KENDALL_SIZE = 65536


def _check_pair(a, b, fn_name):
  """Checks two `[N, ...]` maps on the host; returns `(N, D)`."""
  shape_a, shape_b = tuple(np.shape(a)), tuple(np.shape(b))
  if shape_a != shape_b:
    raise ValueError(
        f'{fn_name}: a and b must have the same shape; got a.shape={shape_a} '
        f'and b.shape={shape_b}.')
  if len(shape_a) < 2:
    raise ValueError(
        f'{fn_name}: maps must be batched, [N, ...] with the batch axis first '
        f'(ndim >= 2); got shape {shape_a}. For one map, pass a[None].')
  n, d = shape_a[0], math.prod(shape_a[1:])
  if d == 0:
    raise ValueError(
        f'{fn_name}: maps must hold at least one value per example; got shape '
        f'{shape_a}.')
  checks.check_finite(f'{fn_name}: a', a)
  checks.check_finite(f'{fn_name}: b', b)
  return n, d


def _flatten_pair(a, b, fn_name):
  """Checks two `[N, ...]` maps and flattens them to `[N, D]`."""
  n, d = _check_pair(a, b, fn_name)
  return jnp.asarray(a).reshape(n, d), jnp.asarray(b).reshape(n, d)


def _as_sortable(x):
  """Bools become int32 so that they sort and compare like numbers."""
  return x.astype(jnp.int32) if x.dtype == jnp.bool_ else x


def _nan_if_any_nan(value, *arrays):
  """NaN where an input holds NaN, like scipy's nan_policy='propagate'."""
  has_nan = jnp.zeros((), jnp.bool_)
  for x in arrays:
    if jnp.issubdtype(x.dtype, jnp.inexact):
      has_nan = has_nan | jnp.any(jnp.isnan(x))
  return jnp.where(has_nan, jnp.nan, value)


def topk_intersection(a, b, *, k):
  """Fraction of the top-k entries of `a` that are also top-k entries of `b`.

  Ties: `jax.lax.top_k` prefers the lower (flattened) index among equal values,
  so the result is deterministic. The original TF evaluation took the last k
  entries of `numpy.argsort`, whose order among equal values is unspecified;
  the two agree whenever the k-th and (k+1)-th largest values differ.

  Args:
    a: `[N, ...]` saliency maps (e.g. `[N, D]` or `[N, H, W]`), flattened per
      example to `D` values.
    b: `[N, ...]` saliency maps, the same shape as `a`.
    k: number of top entries to compare, an int with `1 <= k <= D`.

  Returns:
    `[N]` float32, `|topk(a) ∩ topk(b)| / k` per example, in `[0, 1]`.

  Raises:
    ValueError: if the shapes differ, lack a batch axis, or `k` is not an int
      in `[1, D]`.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.array([[0.9, 0.8, 0.1, 0.0]])
    >>> b = jnp.array([[0.9, 0.0, 0.8, 0.1]])
    >>> topk_intersection(a, b, k=2)
    Array([0.5], dtype=float32)

  References:
    Ghorbani, Abid, Zou, "Interpretation of Neural Networks is Fragile",
    AAAI 2019; Chen et al., "Robust Attribution Regularization", NeurIPS 2019.
  """
  n, d = _check_pair(a, b, 'topk_intersection')
  if isinstance(k, bool):
    raise ValueError(f'k must be an int with 1 <= k <= {d}; got k={k!r}.')
  try:
    k = operator.index(k)
  except TypeError:
    raise ValueError(
        f'k must be an int with 1 <= k <= {d}; got k={k!r} '
        f'({type(k).__name__}).') from None
  if k < 1:
    raise ValueError(f'k={k} is smaller than 1; accepted: 1 <= k <= {d}.')
  if k > d:
    raise ValueError(
        f'k={k} is larger than the map ({d} values per example); '
        f'accepted: 1 <= k <= {d}.')
  a, b = _flatten_pair(a, b, 'topk_intersection')
  _, top_a = lax.top_k(_as_sortable(a), k)  # [N, k]
  _, top_b = lax.top_k(_as_sortable(b), k)  # [N, k]
  rows = jnp.arange(n)[:, None]
  # A [N, D] membership mask keeps memory at O(N * D), not O(N * D * k).
  in_top_a = jnp.zeros((n, d), jnp.bool_).at[rows, top_a].set(True)
  shared = jnp.sum(in_top_a[rows, top_b], axis=-1, dtype=jnp.int32)
  return shared.astype(jnp.float32) / k


def _divide_by_sqrt(numerator, square):
  """`numerator / sqrt(square)` with a true sqrt and a true division.

  In IEEE arithmetic sqrt(fl(x * x)) == x, so the correlation of a map with
  itself (or its negation) comes out exactly 1 (-1). The barrier stops XLA
  from rewriting the division as a multiplication by the approximate rsqrt.
  """
  return numerator / lax.optimization_barrier(jnp.sqrt(square))


def _tied_pairs(new_run):
  """Σ t(t-1)/2 over runs of equal values, from the run-start flags `[D]`."""
  index = jnp.arange(new_run.shape[0], dtype=jnp.int32)
  run_start = lax.cummax(jnp.where(new_run, index, 0), axis=0)
  # Position i of a run that started at s pairs with the i - s earlier members.
  return jnp.sum(index - run_start)


def _starts_run(sorted_values):
  """`[D]` bool: True where a sorted value differs from its predecessor."""
  return jnp.concatenate([
      jnp.ones((1,), jnp.bool_), sorted_values[1:] != sorted_values[:-1]])


def _inversions_and_sort(values):
  """Counts pairs i < j with values[i] > values[j] by a bottom-up merge sort.

  At the level with block width w, each block of 2w holds two sorted halves.
  A stable sort of the block merges them, and a right-half element moves left
  by exactly the number of left-half elements greater than it (equal ones stay
  in front of it); summing those moves over all levels counts the inversions.
  Reading the counts off the merge's permutation, rather than from a separate
  `searchsorted`, gives the same numbers with half the work and a program
  without while loops, which compiles about 3x faster.

  Args:
    values: `[D]` array.

  Returns:
    `(count, sorted_values)`: int32 scalar and `[D]` sorted copy.
  """
  d = values.shape[0]
  size = 1 << (d - 1).bit_length()  # Next power of two >= d.
  if jnp.issubdtype(values.dtype, jnp.inexact):
    pad = jnp.inf
  else:
    pad = jnp.iinfo(values.dtype).max
  # Padding sits at the end and is >= everything, so it adds no inversions.
  merged = jnp.concatenate([values, jnp.full((size - d,), pad, values.dtype)])
  count = jnp.zeros((), jnp.int32)
  width = 1
  while width < size:  # log2(size) levels, unrolled at trace time.
    num_blocks = size // (2 * width)
    position = jnp.broadcast_to(
        jnp.arange(2 * width, dtype=jnp.int32), (num_blocks, 2 * width))
    blocks, came_from = lax.sort(
        (merged.reshape(num_blocks, 2 * width), position),
        dimension=1, is_stable=True, num_keys=1)  # Each [size / 2w, 2w].
    count += jnp.sum(jnp.where(came_from >= width, came_from - position, 0))
    merged = blocks.reshape(size)
    width *= 2
  return count, merged[:d]


def _kendall_tau_single(x, y):
  """Kendall's tau-b of two `[D]` vectors (Knight's algorithm)."""
  d = x.shape[0]
  order = jnp.lexsort((y, x))  # By x, then by y among ties in x.
  x_sorted, y_by_x = x[order], y[order]
  x_runs = _starts_run(x_sorted)
  x_ties = _tied_pairs(x_runs)
  joint_ties = _tied_pairs(x_runs | _starts_run(y_by_x))
  # Ties in x are sorted by y, so strict inversions of y are exactly the
  # discordant pairs.
  discordant, y_sorted = _inversions_and_sort(y_by_x)
  y_ties = _tied_pairs(_starts_run(y_sorted))
  total = jnp.int32(d * (d - 1) // 2)
  # Evaluated in this order every intermediate stays within int32.
  untied = (total - x_ties) - y_ties + joint_ties  # Concordant + discordant.
  con_minus_dis = (untied - discordant) - discordant
  pairs_untied_in_x = (total - x_ties).astype(jnp.float32)
  pairs_untied_in_y = (total - y_ties).astype(jnp.float32)
  tau = _divide_by_sqrt(con_minus_dis.astype(jnp.float32),
                        pairs_untied_in_x * pairs_untied_in_y)
  return jnp.clip(tau, -1.0, 1.0)


def kendall_tau(a, b):
  """Kendall's rank correlation tau-b between two batches of maps.

  Agrees with `scipy.stats.kendalltau` (its default, variant 'b'), ties
  included. Knight's algorithm: sort by `(a, b)`, then count the inversions of
  `b` (the discordant pairs) with a bottom-up merge sort, O(D log^2 D) time
  and O(D) memory per example; tied pairs are counted from runs of equal
  sorted values. Counts are int32, so `D` is limited to 65536 values per
  example.

  A map that is constant (all values tied) gives NaN, as in scipy; so does a
  map containing NaN.

  Args:
    a: `[N, ...]` maps (e.g. `[N, 784]` or `[N, 28, 28]`), flattened per
      example to `D` values.
    b: `[N, ...]` maps, the same shape as `a`.

  Returns:
    `[N]` float32 tau-b per example, in `[-1, 1]` or NaN.

  Raises:
    ValueError: if the shapes differ, lack a batch axis, or `D > 65536`.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.array([[1., 2., 3., 4.], [0., 0., 1., 2.]])
    >>> b = jnp.array([[4., 3., 2., 1.], [0., 0., 2., 1.]])
    >>> kendall_tau(a, b)
    Array([-1. ,  0.6], dtype=float32)

  References:
    Kendall, "The treatment of ties in ranking problems", Biometrika 1945;
    Knight, "A computer method for calculating Kendall's tau with ungrouped
    data", JASA 1966.
  """
  a, b = _flatten_pair(a, b, 'kendall_tau')
  d = a.shape[1]
  if d > MAX_KENDALL_SIZE:
    raise ValueError(
        f'kendall_tau: D={d} values per example (shape {a.shape}) is too '
        f'large; accepted: D <= {MAX_KENDALL_SIZE}, so that pair counts fit '
        'in int32.')
  tau = jax.vmap(_kendall_tau_single)(_as_sortable(a), _as_sortable(b))
  return jax.vmap(_nan_if_any_nan)(tau, a, b)


def _average_ranks(x):
  """`[D]` 1-based ranks of `x`, tied values sharing their mean rank."""
  x_sorted = jnp.sort(x)
  first = jnp.searchsorted(x_sorted, x, side='left')
  after_last = jnp.searchsorted(x_sorted, x, side='right')
  # Tied values occupy ranks first + 1 ... after_last; exact in float32.
  return (first + after_last + 1).astype(jnp.float32) / 2


def _pairwise_sum(values):
  """Sums `[R, D]` over the last axis as a fixed binary tree, giving `[R]`.

  The error grows with log2(D), not D, and every row is summed in the same
  order, so equal (negated) rows give equal (negated) sums bit for bit: that
  makes identical (reversed) maps give exactly 1 (-1).
  """
  d = values.shape[-1]
  size = 1 << (d - 1).bit_length()
  values = jnp.pad(values, [(0, 0), (0, size - d)])
  while values.shape[-1] > 1:
    half = values.shape[-1] // 2
    values = values[:, :half] + values[:, half:]
  return values[:, 0]


def _spearman_rho_single(x, y):
  """Spearman's rho of two `[D]` vectors."""
  d = x.shape[0]
  # Average ranks always sum to D (D + 1) / 2, so centring is exact, and so is
  # scaling by a power of two >= D, which brings the centred ranks into
  # [-1/2, 1/2]: the sums below stay O(D) instead of O(D^3).
  mean_rank = (d + 1) / 2
  scale = 2.0 ** -d.bit_length()
  centred_x = (_average_ranks(x) - mean_rank) * scale
  centred_y = (_average_ranks(y) - mean_rank) * scale
  sum_xy, sum_xx, sum_yy = _pairwise_sum(jnp.stack([
      centred_x * centred_y, centred_x * centred_x, centred_y * centred_y]))
  return jnp.clip(_divide_by_sqrt(sum_xy, sum_xx * sum_yy), -1.0, 1.0)


def spearman_rho(a, b):
  """Spearman's rank correlation between two batches of maps.

  The Pearson correlation of the average ranks (tied values share the mean of
  their ranks), as `scipy.stats.spearmanr`. A constant map gives NaN, as in
  scipy; so does a map containing NaN.

  Args:
    a: `[N, ...]` maps, flattened per example to `D` values.
    b: `[N, ...]` maps, the same shape as `a`.

  Returns:
    `[N]` float32 rho per example, in `[-1, 1]` or NaN.

  Raises:
    ValueError: if the shapes differ or lack a batch axis.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.array([[1., 2., 3., 4.]])
    >>> b = jnp.array([[1., 3., 2., 4.]])
    >>> spearman_rho(a, b)
    Array([0.8], dtype=float32)

  References:
    Spearman, "The proof and measurement of association between two things",
    American Journal of Psychology 1904.
  """
  a, b = _flatten_pair(a, b, 'spearman_rho')
  rho = jax.vmap(_spearman_rho_single)(_as_sortable(a), _as_sortable(b))
  return jax.vmap(_nan_if_any_nan)(rho, a, b)


def accuracy(logits, labels):
  """Per-example correctness of the arg-max prediction.

  The mean of the result is the top-1 accuracy; for evaluation across devices,
  sum it and count the examples. Among equal largest logits the lowest class
  index is predicted.

  Args:
    logits: `[N, C]` class scores.
    labels: `[N]` integer class indices in `[0, C)`.

  Returns:
    `[N]` float32, 1.0 where `argmax(logits) == labels`, else 0.0.

  Raises:
    ValueError: if the shapes do not match `[N, C]` and `[N]`, or the labels
      are not integers.

  Example:
    >>> import jax.numpy as jnp
    >>> logits = jnp.array([[2., 1., 0.], [0., 1., 2.]])
    >>> accuracy(logits, jnp.array([0, 1]))
    Array([1., 0.], dtype=float32)

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (natural
    and adversarial accuracy).
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim != 2 or labels.ndim != 1 or (
      logits.shape[0] != labels.shape[0]):
    raise ValueError(
        'accuracy: expected logits [N, C] and labels [N]; got '
        f'logits.shape={logits.shape} and labels.shape={labels.shape}.')
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
        'accuracy: labels must be integer class indices; got dtype '
        f'{labels.dtype}.')
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def _centre_of_mass(maps):
  """`[N, 2]` (row, col) centres of mass of `[N, H, W]` maps."""
  maps = maps.astype(jnp.float32)
  _, height, width = maps.shape
  total = jnp.sum(maps, axis=(1, 2))
  row = jnp.sum(maps, axis=2) @ jnp.arange(height, dtype=jnp.float32) / total
  col = jnp.sum(maps, axis=1) @ jnp.arange(width, dtype=jnp.float32) / total
  return jnp.stack([row, col], axis=-1)


def mass_center_shift(a, b):
  """Distance between the centres of mass of two batches of 2-D maps.

  The centre of mass weights each pixel's (row, col) coordinates by its value,
  as `scipy.ndimage.center_of_mass`; weights should be non-negative (the
  paper's saliency maps are). A map summing to zero gives NaN.

  Args:
    a: `[N, H, W]` saliency maps.
    b: `[N, H, W]` saliency maps.

  Returns:
    `[N]` float32 Euclidean distance between the centres, in pixels.

  Raises:
    ValueError: if the shapes differ or are not `[N, H, W]`.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.zeros((1, 8, 8)).at[0, 1, 1].set(1.)
    >>> b = jnp.zeros((1, 8, 8)).at[0, 4, 5].set(1.)
    >>> mass_center_shift(a, b)
    Array([5.], dtype=float32)

  References:
    Ghorbani, Abid, Zou, "Interpretation of Neural Networks is Fragile",
    AAAI 2019 (centre-of-mass dissimilarity).
  """
  a = jnp.asarray(a)
  b = jnp.asarray(b)
  if a.shape != b.shape:
    raise ValueError(
        'mass_center_shift: a and b must have the same shape; got '
        f'a.shape={a.shape} and b.shape={b.shape}.')
  if a.ndim != 3:
    raise ValueError(
        'mass_center_shift: maps must be [N, H, W] (sum channels first); '
        f'got shape {a.shape}.')
  shift = _centre_of_mass(a) - _centre_of_mass(b)
  return jnp.sqrt(jnp.sum(jnp.square(shift), axis=-1))

"""Tests for rar_jax.metrics: the mathematics, against scipy and by hand."""
import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from scipy import stats

from rar_jax import metrics

# One jitted wrapper per metric; jit caches by function and shape, so tests
# that reuse a shape reuse its compilation.
_kendall = jax.jit(metrics.kendall_tau)
_spearman = jax.jit(metrics.spearman_rho)


def _scipy_kendall(a, b):
  return stats.kendalltau(a, b).statistic  # Default variant is 'b'.


def _scipy_spearman(a, b):
  return stats.spearmanr(a, b).statistic


_METRICS = {
    'kendall': (_kendall, _scipy_kendall),
    'spearman': (_spearman, _scipy_spearman),
}


def _scipy_per_example(fn, a, b):
  """`[N]` float64 values of a scipy statistic on flattened examples."""
  a = np.asarray(a, np.float64).reshape(len(a), -1)
  b = np.asarray(b, np.float64).reshape(len(b), -1)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # Constant input warns; the value is NaN.
    return np.array([fn(x, y) for x, y in zip(a, b)])


def _tied_maps(rng, shape):
  """Small integers with about 70% zeros, like a sparse MNIST saliency map."""
  values = rng.integers(1, 4, size=shape)
  return np.where(rng.random(shape) < 0.7, 0, values).astype(np.float32)


def _mnist_like_batch():
  """`[9, 28, 28]` pairs of maps that cover the cases the metrics must get."""
  rng = np.random.default_rng(0)
  shape = (28, 28)
  noise = lambda: rng.normal(size=shape).astype(np.float32)
  cont = noise()
  tied_a, tied_b = _tied_maps(rng, (2,) + shape)
  one_off = np.zeros(shape, np.float32)
  one_off[3, 5] = 1.0
  with_nan = noise()
  with_nan[0, 0] = np.nan
  pairs = [
      (noise(), noise()),  # Independent, continuous.
      (cont, cont + 0.5 * noise()),  # Correlated, continuous.
      (tied_a, tied_b),  # Heavily tied, independent.
      (tied_a, tied_a + _tied_maps(rng, shape)),  # Heavily tied, correlated.
      (one_off, noise()),  # All tied but one.
      (one_off, tied_b),  # All tied but one against heavy ties.
      (cont, cont),  # Identical.
      (np.zeros(shape, np.float32), cont),  # Constant: NaN.
      (with_nan, cont),  # NaN propagates.
  ]
  a, b = (np.stack(maps) for maps in zip(*pairs))
  return a, b


@pytest.mark.parametrize('name', ['kendall', 'spearman'])
def test_rank_correlation_matches_scipy_on_mnist_sized_maps(name):
  fn, scipy_fn = _METRICS[name]
  a, b = _mnist_like_batch()
  got = np.asarray(fn(a, b))
  chex.assert_shape(got, (len(a),))
  assert got.dtype == np.float32
  np.testing.assert_allclose(
      got, _scipy_per_example(scipy_fn, a, b), rtol=0, atol=1e-6)
  assert np.isnan(got[-2]) and np.isnan(got[-1])  # Constant, NaN input.


@pytest.mark.parametrize('name', ['kendall', 'spearman'])
def test_rank_correlation_identical_and_reversed(name):
  fn, _ = _METRICS[name]
  a, _ = _mnist_like_batch()  # Same shape as above: no new compilation.
  # Exact: the numerator and sqrt(denominator) round to the same float32.
  np.testing.assert_array_equal(fn(a, a)[:7], np.ones(7))
  # Negation reverses every untied pair; ties stay ties.
  np.testing.assert_array_equal(fn(a, -a)[:7], -np.ones(7))
  # The last two maps are constant and NaN.
  assert np.all(np.isnan(fn(a, a)[7:]))


@pytest.mark.parametrize('name', ['kendall', 'spearman'])
def test_rank_correlation_matches_scipy_on_large_maps(name):
  # 128 x 128 = 16384 values: pair counts near 1.3e8 still fit in int32, and
  # float32 keeps about 7 digits, so 1e-6 holds here too.
  fn, scipy_fn = _METRICS[name]
  rng = np.random.default_rng(1)
  shape = (128, 128)
  cont = rng.normal(size=shape).astype(np.float32)
  tied = _tied_maps(rng, shape)
  a = np.stack([cont, tied])
  b = np.stack([cont + rng.normal(size=shape).astype(np.float32),
                tied + _tied_maps(rng, shape)])
  np.testing.assert_allclose(
      fn(a, b), _scipy_per_example(scipy_fn, a, b), rtol=0, atol=1e-6)


@pytest.mark.parametrize('name', ['kendall', 'spearman'])
def test_rank_correlation_on_integer_maps(name):
  # Integer maps pad the merge sort with the dtype's maximum, not +inf.
  fn, scipy_fn = _METRICS[name]
  rng = np.random.default_rng(2)
  a = rng.integers(-3, 4, size=(3, 30)).astype(np.int32)
  b = rng.integers(-3, 4, size=(3, 30)).astype(np.int32)
  b[0, :2] = np.iinfo(np.int32).max
  np.testing.assert_allclose(
      fn(a, b), _scipy_per_example(scipy_fn, a, b), rtol=0, atol=1e-6)


def test_kendall_tau_hand_computed_with_ties():
  # x = (0, 0, 1, 2), y = (0, 0, 2, 1): 6 pairs, 1 tied in both, 4 concordant,
  # 1 discordant, so tau_b = (4 - 1) / sqrt(5 * 5) = 0.6.
  a = jnp.array([[0., 0., 1., 2.], [1., 2., 3., 4.]])
  b = jnp.array([[0., 0., 2., 1.], [4., 3., 2., 1.]])
  np.testing.assert_allclose(_kendall(a, b), [0.6, -1.0], atol=1e-7)


def test_spearman_rho_uses_average_ranks():
  # Ranks of (5, 5, 1, 7) are (2.5, 2.5, 1, 4); against ranks (1, 2, 3, 4)
  # the centred vectors are (0, 0, -1.5, 1.5) and (-1.5, -.5, .5, 1.5):
  # rho = (-0.75 + 2.25) / (sqrt(4.5) * sqrt(5)).
  a = jnp.array([[5., 5., 1., 7.]])
  b = jnp.array([[1., 2., 3., 4.]])
  want = 1.5 / np.sqrt(4.5 * 5.0)
  np.testing.assert_allclose(_spearman(a, b), [want], atol=1e-7)


def _numpy_topk_intersection(a, b, k):
  a = a.reshape(len(a), -1)
  b = b.reshape(len(b), -1)
  return np.array([
      len(set(np.argsort(x)[-k:]) & set(np.argsort(y)[-k:])) / k
      for x, y in zip(a, b)])


@pytest.mark.parametrize('k', [1, 10, 100, 500])
def test_topk_intersection_matches_numpy_sets(k):
  rng = np.random.default_rng(3)
  # Continuous values have no ties, so the top-k sets are unique.
  a = rng.normal(size=(5, 28, 28)).astype(np.float32)
  b = a + rng.normal(size=a.shape).astype(np.float32)
  got = jax.jit(functools.partial(metrics.topk_intersection, k=k))(a, b)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _numpy_topk_intersection(a, b, k), atol=0)


def test_topk_intersection_identical_and_whole_map():
  rng = np.random.default_rng(4)
  a = rng.normal(size=(3, 7, 7)).astype(np.float32)
  b = rng.normal(size=(3, 7, 7)).astype(np.float32)
  np.testing.assert_array_equal(metrics.topk_intersection(a, a, k=5), 1.0)
  np.testing.assert_array_equal(metrics.topk_intersection(a, b, k=49), 1.0)


def test_topk_intersection_breaks_ties_by_lower_index():
  a = jnp.array([[1., 1., 1., 0.]])
  # top-2 of a is {0, 1}: the lower indices among the three tied values.
  np.testing.assert_array_equal(
      metrics.topk_intersection(a, jnp.array([[0., 1., 0., 1.]]), k=2), [0.5])
  np.testing.assert_array_equal(
      metrics.topk_intersection(a, jnp.array([[9., 8., 0., 0.]]), k=2), [1.0])


def test_accuracy_per_example():
  logits = jnp.array([[2., 1., 0.], [0., 1., 2.], [3., 3., 0.], [0., 5., 5.]])
  labels = jnp.array([0, 1, 0, 2])
  # Ties predict the lowest index: example 2 is right, example 3 is wrong.
  got = jax.jit(metrics.accuracy)(logits, labels)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, [1., 0., 1., 0.])


def test_mass_center_shift_single_pixel_moved_by_3_4():
  a = jnp.zeros((2, 10, 12)).at[0, 2, 3].set(1.).at[1, 0, 0].set(7.)
  b = jnp.zeros((2, 10, 12)).at[0, 5, 7].set(1.).at[1, 0, 0].set(2.)
  np.testing.assert_allclose(metrics.mass_center_shift(a, b), [5., 0.])


def test_mass_center_shift_matches_scipy_center_of_mass():
  rng = np.random.default_rng(5)
  a = rng.random((3, 9, 11)).astype(np.float32)
  b = np.where(rng.random((3, 9, 11)) < 0.8, 0.0, a).astype(np.float32)
  want = [np.linalg.norm(np.subtract(ndimage.center_of_mass(x),
                                     ndimage.center_of_mass(y)))
          for x, y in zip(a, b)]
  np.testing.assert_allclose(
      jax.jit(metrics.mass_center_shift)(a, b), want, rtol=1e-5, atol=1e-5)


def test_no_retracing_across_batches_of_the_same_shape():
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def all_metrics(a, b, logits, labels):
    return (metrics.topk_intersection(a, b, k=4), metrics.kendall_tau(a, b),
            metrics.spearman_rho(a, b), metrics.mass_center_shift(a, b),
            metrics.accuracy(logits, labels))

  rng = np.random.default_rng(6)
  for _ in range(2):
    a, b = rng.random((2, 3, 5, 5)).astype(np.float32)
    logits = rng.normal(size=(3, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=3).astype(np.int32)
    outputs = all_metrics(a, b, logits, labels)
    chex.assert_shape(outputs, [(3,)] * 5)


def test_pmap_matches_single_device():
  num_devices = jax.local_device_count()
  rng = np.random.default_rng(7)
  a = _tied_maps(rng, (num_devices, 2, 6, 6))
  b = _tied_maps(rng, (num_devices, 2, 6, 6))
  sharded = jax.pmap(metrics.kendall_tau)(a, b)
  single = _kendall(a.reshape(-1, 6, 6), b.reshape(-1, 6, 6))
  np.testing.assert_allclose(sharded.reshape(-1), single, atol=1e-7)


@pytest.mark.parametrize('k, match', [
    (900, r'k=900 is larger than the map \(784 values per example\); '
          r'accepted: 1 <= k <= 784'),
    (0, r'k=0 is smaller than 1; accepted: 1 <= k <= 784'),
    (2.5, r'k must be an int with 1 <= k <= 784; got k=2.5'),
    (True, r'k must be an int .* got k=True'),
])
def test_topk_intersection_rejects_bad_k(k, match):
  a = jnp.zeros((2, 28, 28))
  with pytest.raises(ValueError, match=match):
    metrics.topk_intersection(a, a, k=k)


@pytest.mark.parametrize('fn', [
    metrics.kendall_tau, metrics.spearman_rho, metrics.mass_center_shift,
    functools.partial(metrics.topk_intersection, k=1),
])
def test_mismatched_shapes_are_rejected(fn):
  with pytest.raises(ValueError, match=r'a\.shape=\(2, 28, 28\) and '
                     r'b\.shape=\(2, 28, 27\)'):
    fn(jnp.zeros((2, 28, 28)), jnp.zeros((2, 28, 27)))


def test_unbatched_maps_are_rejected():
  with pytest.raises(ValueError, match=r'ndim >= 2\); got shape \(784,\)'):
    metrics.kendall_tau(jnp.zeros(784), jnp.zeros(784))
  with pytest.raises(ValueError, match=r'\[N, H, W\].*got shape \(2, 784\)'):
    metrics.mass_center_shift(jnp.zeros((2, 784)), jnp.zeros((2, 784)))


def test_kendall_tau_size_limit():
  fits = jax.ShapeDtypeStruct((1, 256, 256), jnp.float32)  # D = 65536.
  assert jax.eval_shape(metrics.kendall_tau, fits, fits).shape == (1,)
  too_big = jax.ShapeDtypeStruct((1, 65537), jnp.float32)
  with pytest.raises(ValueError, match=r'D=65537 .*accepted: D <= 65536'):
    jax.eval_shape(metrics.kendall_tau, too_big, too_big)


def test_accuracy_rejects_bad_inputs():
  with pytest.raises(ValueError, match=r'logits\.shape=\(3, 4\) and '
                     r'labels\.shape=\(2,\)'):
    metrics.accuracy(jnp.zeros((3, 4)), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match=r'integer class indices; got dtype '
                     r'float32'):
    metrics.accuracy(jnp.zeros((3, 4)), jnp.zeros(3))

"""Tests of rar_jax.attribution: the mathematics of IG and its derivatives."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rar_jax import attribution
from rar_jax import vma
from rar_jax.attribution import integrated_gradients

METHODS = attribution.METHODS


def _normal(seed, shape, dtype=np.float32):
  """Standard normal test inputs, drawn by NumPy.

  An eager `jax.random.normal` compiles a threefry kernel for every new
  shape (0.5-5 s each on a 2-core CPU); these are only test data.
  """
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _mlp_params(seed, d_in=6, d_hidden=8, dtype=np.float32):
  w1, b1, w2 = (_normal((seed, i), s, dtype) for i, s in enumerate(
      [(d_in, d_hidden), (d_hidden,), (d_hidden,)]))
  return {"w1": w1 / np.sqrt(d_in, dtype=dtype), "b1": 0.1 * b1, "w2": w2}


def _mlp(params, x):
  """A smooth per-example scalar network, [N, d] -> [N]."""
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_steps", [2, 7, 50])
def test_linear_function_is_exact_at_any_step_count(method, num_steps):
  w = jnp.array([1.5, -2.0, 0.25, 3.0])
  f = lambda x: x @ w + 7.0
  x = _normal(0, (3, 4))
  b = _normal(1, (3, 4))
  ig, delta = integrated_gradients(
      f, x, b, num_steps=num_steps, method=method, return_delta=True)
  np.testing.assert_allclose(ig, (x - b) * w, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(delta, 0.0, atol=1e-5)


def test_single_step_right_riemann_is_gradient_times_input():
  f = lambda x: jnp.sum(jnp.sin(x), axis=-1)
  x = jnp.array([[0.3, -1.2, 2.0]])
  ig = integrated_gradients(f, x, num_steps=1)
  np.testing.assert_allclose(ig, x * jnp.cos(x), rtol=1e-6)


def test_riemann_right_is_the_papers_formula():
  params = _mlp_params(0)
  f = functools.partial(_mlp, params)
  x = _normal(1, (4, 6))
  b = _normal(2, (4, 6))
  m = 13
  grad_f = jax.grad(lambda z: jnp.sum(f(z)))
  expected = sum(grad_f(b + (k / m) * (x - b)) for k in range(1, m + 1))
  expected = (x - b) * expected / m
  np.testing.assert_allclose(
      integrated_gradients(f, x, b, num_steps=m), expected, rtol=1e-5,
      atol=1e-6)


def test_path_points_of_each_rule():
  a, w = attribution.path_points("riemann_right", 4)
  np.testing.assert_allclose(a, [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(w, [0.25] * 4)
  a, _ = attribution.path_points("riemann_left", 4)
  np.testing.assert_allclose(a, [0.0, 0.25, 0.5, 0.75])
  a, _ = attribution.path_points("riemann_middle", 4)
  np.testing.assert_allclose(a, [0.125, 0.375, 0.625, 0.875])
  a, w = attribution.path_points("riemann_trapezoid", 5)
  np.testing.assert_allclose(a, [0.0, 0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(w, [0.125, 0.25, 0.25, 0.25, 0.125])
  for method in METHODS:
    a, w = attribution.path_points(method, 9)
    assert a.shape == w.shape == (9,)
    assert np.all((a >= 0) & (a <= 1))
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
  # Gauss-Legendre with m points integrates degree 2m - 1 exactly.
  a, w = attribution.path_points("gauss_legendre", 3)
  np.testing.assert_allclose(np.sum(w * a ** 5), 1 / 6, rtol=1e-6)


def test_completeness_error_shrinks_and_gauss_legendre_is_far_better():
  with jax.enable_x64(True):
    params = _mlp_params(3, dtype=np.float64)
    f = functools.partial(_mlp, params)
    x = 2.0 * _normal(4, (5, 6), np.float64)

    def gap(method, m):
      _, delta = integrated_gradients(
          f, x, num_steps=m, method=method, return_delta=True)
      return float(jnp.max(jnp.abs(delta)))

    right = [gap("riemann_right", m) for m in (10, 100, 1000)]
    assert right[0] > 5 * right[1] > 25 * right[2] > 0   # O(1/m)
    middle = [gap("riemann_middle", m) for m in (10, 100)]
    assert middle[0] > 50 * middle[1]                    # O(1/m^2)
    assert gap("riemann_trapezoid", 101) < right[1] / 10
    gl = gap("gauss_legendre", 10)
    assert gl < right[0] * 1e-3, (gl, right[0])   # three orders better
    assert gap("gauss_legendre", 20) < 1e-9


def test_completeness_at_the_papers_tolerance_in_float32():
  params = _mlp_params(5)
  f = functools.partial(_mlp, params)
  x = _normal(6, (3, 6))
  _, delta = integrated_gradients(f, x, num_steps=2000, return_delta=True,
                                  chunk_size=500)
  scale = jnp.abs(f(x) - f(jnp.zeros_like(x)))
  assert float(jnp.max(jnp.abs(delta) / scale)) < 1e-3


def test_sensitivity_unused_coordinate_gets_zero():
  f = lambda x: jnp.tanh(x[:, 0] * x[:, 1])   # ignores x[:, 2]
  x = jnp.array([[1.0, 2.0, 3.0]])
  ig = integrated_gradients(f, x, num_steps=20)
  assert ig[0, 2] == 0.0
  assert ig[0, 0] != 0.0 and ig[0, 1] != 0.0


@pytest.mark.parametrize("method", ["riemann_right", "gauss_legendre"])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 50])
def test_chunked_equals_unchunked(method, chunk_size):
  params = _mlp_params(7)
  f = functools.partial(_mlp, params)
  x = _normal(8, (4, 6))
  b = _normal(9, (6,))
  full = integrated_gradients(f, x, b, num_steps=16, method=method)
  chunked = integrated_gradients(
      f, x, b, num_steps=16, method=method, chunk_size=chunk_size)
  np.testing.assert_allclose(chunked, full, rtol=1e-6, atol=1e-7)


def test_auto_chunk_size_by_platform():
  cpu = attribution.CPU_IMAGES_PER_CHUNK
  assert attribution.auto_chunk_size(cpu, 100, "cpu") == 1
  assert attribution.auto_chunk_size(3 * cpu, 100, "cpu") == 1
  # The largest divisor of the steps within cpu // batch images.
  assert attribution.auto_chunk_size(1, 100, "cpu") == 50
  assert attribution.auto_chunk_size(4, 100, "cpu") == 10
  assert attribution.auto_chunk_size(cpu // 8, 97, "cpu") == 1  # A prime.
  assert attribution.auto_chunk_size(1, cpu, "cpu") is None  # Covers all.
  for platform in ("gpu", "tpu"):
    assert attribution.auto_chunk_size(1, 100, platform) is None
  assert attribution.auto_chunk_size(1, 100) == attribution.auto_chunk_size(
      1, 100, jax.default_backend())


def test_unrolled_chunk_size_rule():
  rule, most = attribution.unrolled_chunk_size, attribution.MAX_UNROLLED_CHUNKS
  assert most == 20
  assert rule(50, 10, "cpu") == 1      # auto_chunk_size's 10 chunks of 1
  assert rule(50, 20, "cpu") == 1      # 20 chunks: as many as unroll
  assert rule(50, 21, "cpu") == 2      # 21 of 1 -> 10 of 2 and 1 of 1
  assert rule(50, 100, "cpu") == 5     # 100 of 1 -> 20 of 5
  assert rule(12, 100, "cpu") == 5     # auto: 5 (<= 64 // 12 images)
  assert rule(3, 100, "cpu") == 20     # auto: 20, 5 chunks
  assert rule(1, 97, "cpu") == 5       # 97 of 1 -> 19 of 5 and 1 of 2
  assert rule(64, 30, "cpu") == 2      # 30 of 1 -> 15 of 2
  assert rule(1, 21, "cpu") is None    # auto: all 21 at once
  assert rule(4, 10, "cpu") is None    # auto: no chunks
  for platform in ("gpu", "tpu"):
    assert rule(50, 100, platform) is None


def test_auto_chunking_equals_all_at_once():
  """The default ("auto": chunks of CPU_IMAGES_PER_CHUNK // N points on CPU,
  a lax.scan) gives the one-vmap result, also through a second derivative."""
  params = _mlp_params(7)
  x = _normal(8, (4, 6))
  steps = 35  # On CPU: 5 chunks of 7 points (7 <= 64 // 4 = 16).
  assert jax.default_backend() != "cpu" or attribution.auto_chunk_size(
      4, steps) == 7

  def reg(p, chunk_size):
    f = functools.partial(_mlp, p)
    return jnp.sum(jnp.abs(integrated_gradients(
        f, x, num_steps=steps, chunk_size=chunk_size)))

  f = functools.partial(_mlp, params)
  np.testing.assert_allclose(
      integrated_gradients(f, x, num_steps=steps),
      integrated_gradients(f, x, num_steps=steps, chunk_size=None),
      rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(jax.grad(reg)(params, "auto"),
                              jax.grad(reg)(params, None), rtol=1e-5,
                              atol=1e-6)


@pytest.mark.parametrize("chunk_size", [3, 4])   # 5 chunks + 1 point; 4 even
def test_unrolled_chunks_equal_the_scan_to_second_order(chunk_size,
                                                       count_eqns):
  """`unroll_chunks=True` traces no scan and gives the scan's values, input
  gradients (what the inner maximisations use) and, through the gradient of
  the IG norm in the inputs, parameter gradients: a second derivative."""
  params = _mlp_params(7)
  x, b = _normal(8, (4, 6)), _normal(9, (6,))

  def norm(p, x, unroll):
    f = functools.partial(_mlp, p)
    return jnp.sum(jnp.abs(integrated_gradients(
        f, x, b, num_steps=16, chunk_size=chunk_size, unroll_chunks=unroll)))

  def input_grad_norm(p, unroll):   # parameters through d/dx ||IG||_1
    return jnp.sum(jnp.abs(jax.grad(norm, argnums=1)(p, x, unroll)))

  assert count_eqns(lambda p: norm(p, x, False), params) == 1
  assert count_eqns(lambda p: norm(p, x, True), params) == 0
  # One traced copy of the gradient per chunk (the remainder's included).
  dots = lambda c, unroll: count_eqns(
      lambda x: integrated_gradients(functools.partial(_mlp, params), x, b,
                                     num_steps=16, chunk_size=c,
                                     unroll_chunks=unroll),
      x, primitive="dot_general")
  assert dots(chunk_size, True) == -(-16 // chunk_size) * dots(None, False)
  f = functools.partial(_mlp, params)
  np.testing.assert_allclose(
      integrated_gradients(f, x, b, num_steps=16, chunk_size=chunk_size,
                           unroll_chunks=True),
      integrated_gradients(f, x, b, num_steps=16, chunk_size=chunk_size),
      rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(jax.grad(norm, argnums=1)(params, x, True),
                             jax.grad(norm, argnums=1)(params, x, False),
                             rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jax.grad(input_grad_norm)(params, True),
                              jax.grad(input_grad_norm)(params, False),
                              rtol=1e-5, atol=1e-6)
  # Without chunks there is nothing to unroll: the same one-vmap program.
  np.testing.assert_array_equal(
      integrated_gradients(f, x, b, num_steps=16, chunk_size=None,
                           unroll_chunks=True),
      integrated_gradients(f, x, b, num_steps=16, chunk_size=None))


@pytest.mark.parametrize("unroll", [False, True])
def test_under_shard_map_the_parameter_gradient_is_the_same_program(
    unroll, find_eqns):
  """IG's parameter gradient under `jax.shard_map` on 4 devices: the values
  of the plain program, and no more residuals stacked by its scans.

  Replicated parameters, a batch split over the devices, and the gradient
  of the IG norm summed over them. The quadrature nodes and weights enter
  the scan already varying like the inputs: cast inside its body, the
  backward pass stacked them per iteration (one more scan output), where XLA
  otherwise folds the constant weights. The unrolled chunks (no scan) are
  checked for their values only.
  """
  params = _mlp_params(30)
  x = _normal(31, (8, 6))

  def reg(p, x):
    ig = integrated_gradients(functools.partial(_mlp, p), x, num_steps=6,
                              chunk_size=2, unroll_chunks=unroll)
    return jnp.sum(ig ** 2)

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("batch",))
  P = jax.sharding.PartitionSpec
  sharded = jax.jit(jax.shard_map(
      lambda p, x: jax.lax.psum(jax.grad(reg)(vma.varying_like(p, x), x),
                                "batch"),
      mesh=mesh, in_specs=(P(), P("batch")), out_specs=P()))
  chex.assert_trees_all_close(sharded(params, x), jax.grad(reg)(params, x),
                              rtol=1e-5, atol=1e-6)
  scan_outputs = lambda fn: [len(eqn.outvars)
                              for eqn in find_eqns(fn, params, x)]
  plain = scan_outputs(jax.grad(reg))
  assert len(plain) == (0 if unroll else 2)   # forward and backward
  assert scan_outputs(sharded) == plain


def test_per_example_baselines_match_one_at_a_time():
  params = _mlp_params(10)
  f = functools.partial(_mlp, params)
  x = _normal(11, (3, 6))
  b = _normal(12, (3, 6))
  batched = integrated_gradients(f, x, b, num_steps=10)
  for i in range(3):
    one = integrated_gradients(f, x[i:i + 1], b[i:i + 1], num_steps=10)
    np.testing.assert_allclose(batched[i:i + 1], one, rtol=1e-6, atol=1e-7)


def test_image_shaped_inputs_and_broadcast_baseline():
  w = _normal(13, (5, 5, 2))
  f = lambda x: jnp.sum(jnp.tanh(x * w), axis=(1, 2, 3))
  x = np.random.default_rng(14).uniform(size=(2, 5, 5, 2)).astype(np.float32)
  ig, delta = integrated_gradients(f, x, jnp.float32(0.5), num_steps=64,
                                   method="gauss_legendre", return_delta=True)
  assert ig.shape == x.shape
  np.testing.assert_allclose(delta, 0.0, atol=1e-5)


def test_second_order_gradients_match_finite_differences():
  with jax.enable_x64(True):
    params = _mlp_params(15, d_in=3, d_hidden=4,
                         dtype=np.float64)
    x = _normal(16, (2, 3), np.float64)
    b = _normal(17, (2, 3), np.float64)

    def size(params, x, b):
      # The regulariser of the paper: ||IG||_1, here smoothed as sum(IG^2).
      ig = integrated_gradients(functools.partial(_mlp, params), x, b,
                                num_steps=5)
      return jnp.sum(ig ** 2)

    # d/d(params, inputs, baselines), first and second order, vs finite
    # differences; each already differentiates through the gradient in IG.
    # Jitted, so that the many evaluations of check_grads reuse one program
    # each (eagerly, every small op compiles on its own).
    check_grads(jax.jit(size), (params, x, b), order=2, modes=["rev"],
                atol=1e-5, rtol=1e-5)
    check_grads(
        jax.jit(lambda p: integrated_gradients(
            functools.partial(_mlp, p), x, b, num_steps=4, chunk_size=3)),
        (params,), order=2, modes=["fwd", "rev"], atol=1e-5, rtol=1e-5)


def test_parameter_gradient_through_ig_matches_finite_differences_float32():
  params = _mlp_params(18)
  x = _normal(19, (3, 6))

  def reg(p):
    ig = integrated_gradients(functools.partial(_mlp, p), x, num_steps=8)
    return jnp.sum(jnp.abs(ig))

  g = jax.grad(reg)(params)
  direction = jax.tree.map(
      lambda v: _normal(20, v.shape), params)
  eps = 1e-3
  plus = reg(jax.tree.map(lambda p, d: p + eps * d, params, direction))
  minus = reg(jax.tree.map(lambda p, d: p - eps * d, params, direction))
  fd = (plus - minus) / (2 * eps)
  analytic = sum(jnp.vdot(a, d) for a, d in zip(jax.tree.leaves(g),
                                                 jax.tree.leaves(direction)))
  np.testing.assert_allclose(analytic, fd, rtol=2e-2)


def test_no_retracing_for_batches_of_the_same_shape():
  params = _mlp_params(21)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def ig_fn(p, x):
    return integrated_gradients(functools.partial(_mlp, p), x, num_steps=5)

  chex.clear_trace_counter()
  for seed in range(3):
    ig_fn(params, _normal(seed, (4, 6)))


def test_pmap_over_devices_equals_single_device():
  n = jax.local_device_count()
  assert n == 4, "tests/conftest.py should give 4 fake CPU devices"
  params = _mlp_params(22)
  x = _normal(23, (n * 2, 6))
  fn = lambda x: integrated_gradients(functools.partial(_mlp, params), x,
                                      num_steps=6)
  sharded = jax.pmap(fn)(x.reshape(n, 2, 6)).reshape(n * 2, 6)
  np.testing.assert_allclose(sharded, fn(x), rtol=1e-6, atol=1e-7)


def test_gradient_saliency():
  w = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  f = lambda x: jnp.sum(jnp.sin(x @ w), axis=-1)
  x = jnp.array([[0.1, 0.2], [0.3, -0.4]])
  expected = jnp.cos(x @ w) @ w.T
  np.testing.assert_allclose(attribution.gradient_saliency(f, x), expected,
                             rtol=1e-6)


def test_smoothgrad():
  f = lambda x: jnp.sum(x ** 3, axis=-1)
  grad_fn = lambda x: attribution.gradient_saliency(f, x)
  x = jnp.array([[1.0, -2.0, 0.5]])
  key = jax.random.key(0)
  # No noise: the attribution itself.
  np.testing.assert_allclose(
      attribution.smoothgrad(grad_fn, x, key=key, noise_level=0.0,
                             num_samples=3), grad_fn(x), rtol=1e-6)
  # E[3 (x + s n)^2] = 3 x^2 + 3 s^2, with s = 0.1 * (max - min) = 0.3.
  sg = attribution.smoothgrad(grad_fn, x, key=key, noise_level=0.1,
                              num_samples=4000, chunk_size=1000)
  np.testing.assert_allclose(sg, 3 * x ** 2 + 3 * 0.09, atol=0.05)
  sq = attribution.smoothgrad(grad_fn, x, key=key, noise_level=0.0,
                              num_samples=2, squared=True)
  np.testing.assert_allclose(sq, grad_fn(x) ** 2, rtol=1e-6)


def test_saliency_map():
  a = _normal(0, (3, 4, 5, 3))
  s = attribution.saliency_map(a)
  assert s.shape == (3, 4, 5)
  assert bool(jnp.all(s >= 0))
  np.testing.assert_allclose(jnp.sum(s, axis=(1, 2)), 20.0, rtol=1e-5)
  raw = jnp.sum(jnp.abs(a), axis=-1)
  np.testing.assert_allclose(s / s.sum((1, 2), keepdims=True),
                             raw / raw.sum((1, 2), keepdims=True), rtol=1e-5)
  zero = attribution.saliency_map(jnp.zeros((1, 2, 2)))
  np.testing.assert_array_equal(zero, 0.0)


@pytest.mark.parametrize("call, match", [
    (lambda f, x: integrated_gradients(f, x, jnp.zeros((3, 5))),
     r"baselines of shape \(3, 5\) do not broadcast to inputs of shape "
     r"\(2, 3\)"),
    (lambda f, x: integrated_gradients(f, x, num_steps=0),
     r"num_steps=0 .* int >= 1"),
    (lambda f, x: integrated_gradients(f, x, num_steps=2.5),
     r"num_steps=2.5"),
    (lambda f, x: integrated_gradients(f, x, method="simpson"),
     r"'simpson'.*riemann_right, riemann_left"),
    (lambda f, x: integrated_gradients(f, x, num_steps=1,
                                       method="riemann_trapezoid"),
     r"num_steps=1 is too small for riemann_trapezoid"),
    (lambda f, x: integrated_gradients(f, x, chunk_size=0),
     r"chunk_size=0"),
    (lambda f, x: integrated_gradients(f, x, chunk_size="big"),
     r"chunk_size='big' .* None \(all points at once\), 'auto' or an int"),
    (lambda f, x: integrated_gradients(f, x, unroll_chunks="yes"),
     r"unroll_chunks='yes' is not accepted; it must be a bool"),
    (lambda f, x: integrated_gradients(lambda z: z, x),
     r"returned shape \(2, 3\)"),
    (lambda f, x: integrated_gradients(lambda z: jnp.sum(z), x),
     r"per-example scalars of shape \[N\] = \(2,\); it returned shape \(\)"),
    (lambda f, x: integrated_gradients(f, x.astype(jnp.int32)),
     r"floating point.*int32"),
    (lambda f, x: attribution.saliency_map(x[0]),
     r"shape \(3,\) are not accepted"),
    (lambda f, x: attribution.smoothgrad(lambda z: z, x, key=jax.random.key(0),
                                         num_samples=0),
     r"num_samples=0"),
])
def test_bad_input_raises_a_clear_value_error(call, match):
  f = lambda x: jnp.sum(x, axis=-1)
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match=match):
    call(f, x)

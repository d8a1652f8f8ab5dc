"""Tests of rar_jax.attacks.pgd: feasibility, optimality on linear models, no leaks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rar_jax.attacks import pgd, project, random_start


def _uniform(seed, shape, low=0.0, high=1.0):
  """Test inputs drawn by NumPy: an eager `jax.random` draw compiles a
  threefry kernel for every new shape (seconds each on a 2-core CPU)."""
  rng = np.random.default_rng(seed)
  return rng.uniform(low, high, size=shape).astype(np.float32)


def _mlp_objective(seed=0, d=8):
  rng = np.random.default_rng(seed)
  w1 = rng.standard_normal((d, 16)).astype(np.float32)
  w2 = rng.standard_normal(16).astype(np.float32)
  return lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("box", [(0.0, 1.0), (None, None), (0.2, None)])
def test_output_stays_in_the_ball_and_the_box(norm, box):
  clip_min, clip_max = box
  # Centres inside every box tested: clipping to the box can then only move a
  # point towards its centre, so it stays in the ball.
  x = _uniform(1, (16, 8), 0.2, 1.0)
  eps = 0.3 if norm == "linf" else 0.8
  x_adv = pgd(_mlp_objective(), x, epsilon=eps, step_size=0.1, num_steps=7,
              key=jax.random.key(2), norm=norm, clip_min=clip_min,
              clip_max=clip_max)
  delta = np.asarray(x_adv - x)
  if norm == "linf":
    assert np.abs(delta).max() <= eps + 1e-6
  else:
    assert np.linalg.norm(delta, axis=1).max() <= eps + 1e-5
  if clip_min is not None:
    assert x_adv.min() >= clip_min
  if clip_max is not None:
    assert x_adv.max() <= clip_max
  assert not np.allclose(delta, 0.0)


def test_linf_reaches_the_analytic_optimum_of_a_linear_objective():
  w = jnp.array([[1.0, -2.0, 0.5, -0.1]])
  x = jnp.array([[0.5, 0.5, 0.95, 0.5]])
  # max <w, x'> over the ball and [0, 1]: x + eps sign(w), clipped.
  x_adv = pgd(lambda z: z @ w[0], x, epsilon=0.2, step_size=0.05,
              num_steps=10, key=jax.random.key(0))
  np.testing.assert_allclose(x_adv, [[0.7, 0.3, 1.0, 0.3]], atol=1e-6)


def test_l2_reaches_the_analytic_optimum_of_a_linear_objective():
  w = jnp.array([3.0, -4.0])
  x = jnp.zeros((1, 2))
  x_adv = pgd(lambda z: z @ w, x, epsilon=1.0, step_size=0.3, num_steps=10,
              norm="l2", clip_min=None, clip_max=None)
  np.testing.assert_allclose(x_adv, [[0.6, -0.8]], atol=1e-6)


def test_sign_steps_follow_the_original_update_rule():
  # x' <- clip(clip(x' + a sign(g), x - eps, x + eps), 0, 1), K times.
  f = _mlp_objective(3)
  x = _uniform(4, (5, 8))
  key = jax.random.key(5)
  eps, a = 0.3, 0.07
  x_adv = x + jax.random.uniform(key, x.shape, minval=-eps, maxval=eps)
  g_fn = jax.grad(lambda z: jnp.sum(f(z)))
  for _ in range(4):
    x_adv = x_adv + a * jnp.sign(g_fn(x_adv))
    x_adv = jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)
  np.testing.assert_allclose(
      pgd(f, x, epsilon=eps, step_size=a, num_steps=4, key=key), x_adv,
      atol=1e-6)


def test_pgd_increases_the_objective():
  f = _mlp_objective(6)
  x = _uniform(7, (32, 8))
  x_adv = pgd(f, x, epsilon=0.2, step_size=0.02, num_steps=20)
  assert float(jnp.mean(f(x_adv) - f(x))) > 0
  assert bool(jnp.all(f(x_adv) >= f(x) - 1e-6))


def test_gradients_do_not_leak_through_the_attack():
  w = jnp.array([1.0, -2.0])

  def attacked_sum(x, w):
    return jnp.sum(pgd(lambda z: jnp.tanh(z @ w), x, epsilon=0.1,
                       step_size=0.05, num_steps=3))

  gx, gw = jax.grad(attacked_sum, argnums=(0, 1))(jnp.full((2, 2), 0.5), w)
  np.testing.assert_array_equal(gx, 0.0)
  np.testing.assert_array_equal(gw, 0.0)


def test_random_start_is_in_the_ball():
  x = jnp.zeros((200, 10))
  linf = random_start(jax.random.key(0), x, epsilon=0.3)
  assert float(jnp.abs(linf).max()) <= 0.3
  assert float(jnp.abs(linf).max()) > 0.25   # spreads over the whole ball
  l2 = random_start(jax.random.key(1), x, epsilon=2.0, norm="l2")
  norms = jnp.linalg.norm(l2, axis=1)
  assert float(norms.max()) <= 2.0 + 1e-5
  # Uniform in a 10-d ball: P(radius < r) = (r / eps)^10, median ~ 0.933 eps.
  np.testing.assert_allclose(float(jnp.median(norms)), 2.0 * 0.5 ** 0.1,
                             rtol=0.05)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_per_example_keys_do_not_depend_on_the_batch_split(norm):
  x = jnp.zeros((6, 5))
  keys = jax.random.split(jax.random.key(3), 6)
  whole = random_start(keys, x, epsilon=0.5, norm=norm)
  parts = [random_start(keys[i:i + 2], x[i:i + 2], epsilon=0.5, norm=norm)
           for i in (0, 2, 4)]
  np.testing.assert_array_equal(whole, jnp.concatenate(parts))
  assert len({tuple(np.asarray(r).round(6)) for r in whole}) == 6
  with pytest.raises(ValueError, match="batch of 6 PRNG keys"):
    random_start(keys, jnp.zeros((4, 5)), epsilon=0.5)


def test_project_l2_and_box():
  x = jnp.zeros((1, 2))
  np.testing.assert_allclose(
      project(jnp.array([[3.0, 4.0]]), x, epsilon=1.0, norm="l2",
              clip_min=None, clip_max=None), [[0.6, 0.8]], atol=1e-6)
  np.testing.assert_allclose(
      project(jnp.array([[3.0, -4.0]]), x, epsilon=1.0, norm="l2"),
      [[0.6, 0.0]], atol=1e-6)


def test_no_retracing_across_calls_with_equal_shapes():
  f = _mlp_objective(8)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def attack(x, key):
    return pgd(f, x, epsilon=0.1, step_size=0.01, num_steps=5, key=key)

  chex.clear_trace_counter()
  for seed in range(3):
    attack(_uniform(seed, (4, 8)),
           jax.random.key(seed))


def test_compile_is_flat_in_num_steps():
  f = _mlp_objective(9)
  x = jnp.zeros((2, 8))
  hlo = [
      jax.jit(lambda x, n=n: pgd(f, x, epsilon=0.1, step_size=0.01,
                                 num_steps=n)).lower(x).as_text()
      for n in (2, 200)
  ]
  assert abs(len(hlo[0]) - len(hlo[1])) < 50


@pytest.mark.parametrize("kwargs, match", [
    (dict(epsilon=-0.1), r"epsilon=-0.1 .* >= 0"),
    (dict(step_size=0.0), r"step_size=0.0 .* > 0"),
    (dict(step_size=-1), r"step_size=-1"),
    (dict(num_steps=0), r"num_steps=0 .* int >= 1"),
    (dict(num_steps=2.0), r"num_steps=2.0"),
    (dict(norm="l1"), r"Unknown norm 'l1'; accepted: linf, l2"),
    (dict(clip_min=1.0, clip_max=0.0), r"clip_min=1.0 must be smaller"),
])
def test_bad_hyper_parameters_raise(kwargs, match):
  args = dict(epsilon=0.1, step_size=0.01, num_steps=3)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    pgd(lambda z: jnp.sum(z, axis=-1), jnp.zeros((2, 3)), **args)


def test_objective_with_wrong_shape_raises():
  with pytest.raises(ValueError, match=r"returned shape \(\)"):
    pgd(jnp.sum, jnp.zeros((2, 3)), epsilon=0.1, step_size=0.01, num_steps=1)

"""Tests of rar_jax.objectives: the paper's closed forms and identities."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rar_jax import attribution
from rar_jax import models
from rar_jax import objectives
from rar_jax import runtime
from rar_jax.objectives import OBJECTIVES, cross_entropy

# --- A one-layer 2-class model: logits [0, <w, x>], so that the softmax
# cross-entropy is the logistic loss g(-y <w, x>), g(t) = log(1 + e^t), with
# y = +1 for label 1 and y = -1 for label 0 (spec section 2.4).


def _linear_apply(w, x):
  s = x @ w
  return jnp.stack([jnp.zeros_like(s), s], axis=-1)


def _g(t):
  return np.logaddexp(0.0, t)


def _g_prime(t):
  return 1.0 / (1.0 + np.exp(-t))


W = np.array([0.8, -1.5, 0.3], np.float32)
X = np.array([[0.2, 0.4, -0.1], [-0.3, 0.1, 0.5]], np.float32)
LABELS = np.array([1, 0])
Y_PM = 2.0 * LABELS - 1.0
U = -Y_PM * (X @ W)                  # u = -y <w, x>
EPS = 0.25
V_STAR = EPS * np.abs(W).sum()       # the worst-case margin loss eps ||w||_1
NO_BOX = dict(clip_min=None, clip_max=None)


def _riemann_inner_max(m):
  """||IG||_1 at the optimum d* = -y eps sign(w) for an m-point right sum."""
  k = np.arange(1, m + 1)[None, :]
  slope = _g_prime(U[:, None] + k / m * V_STAR).mean(axis=1)
  return V_STAR * slope


def _restarts(n):
  """n copies of the 2 examples: per-example random starts act as restarts."""
  return (jnp.asarray(np.tile(X, (n, 1))), jnp.asarray(np.tile(LABELS, n)))


def _max_over_restarts(values, n):
  return np.asarray(values).reshape(n, 2).max(axis=0)


def test_cross_entropy_is_the_logistic_loss_of_the_linear_model():
  ce = cross_entropy(_linear_apply(jnp.asarray(W), jnp.asarray(X)),
                     jnp.asarray(LABELS))
  np.testing.assert_allclose(ce, _g(U), rtol=1e-6)


def test_inner_maximum_of_the_ig_norm_is_the_closed_form():
  m, n = 200, 64
  x, y = _restarts(n)
  ig_l1 = lambda x_adv: objectives._l1(objectives._loss_ig(
      _linear_apply, jnp.asarray(W), x, y, x_adv, m))
  x_adv = objectives.pgd_lib.pgd(ig_l1, x, epsilon=EPS, step_size=EPS / 4,
                                 num_steps=20, key=jax.random.key(0), **NO_BOX)
  found = np.asarray(ig_l1(x_adv))
  best = _max_over_restarts(found, n)
  # Equal to the m-point Riemann value at the optimum d* (no restart beats it),
  # and to the closed form g(u + eps ||w||_1) - g(u) within the Riemann error.
  np.testing.assert_allclose(best, _riemann_inner_max(m), rtol=1e-5)
  assert found.max() <= _riemann_inner_max(m).max() * (1 + 1e-5)
  np.testing.assert_allclose(best, _g(U + V_STAR) - _g(U), rtol=2e-3)
  # It is attained at d* = -y eps sign(w).
  winner = np.asarray(found).reshape(n, 2).argmax(axis=0)
  x_star = np.asarray(x_adv).reshape(n, 2, 3)[winner, [0, 1]]
  np.testing.assert_allclose(
      x_star - X, -Y_PM[:, None] * EPS * np.sign(W)[None, :], atol=1e-6)


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_ig_norm_is_the_soft_margin_objective(lam):
  m, n = 200, 64
  x, y = _restarts(n)
  loss, aux = objectives.ig_norm(
      _linear_apply, jnp.asarray(W), x, y, key=jax.random.key(1), epsilon=EPS,
      step_size=EPS / 4, num_steps=20, m=m, approx_factor=4, lam=lam, **NO_BOX)
  # (1 - lam) g(u) + lam g(u + eps ||w||_1); lam = 1: g(eps ||w||_1 - y<w,x>).
  expected = (1 - lam) * _g(U) + lam * _g(U + V_STAR)
  np.testing.assert_allclose(_max_over_restarts(loss, n), expected, rtol=2e-3)
  np.testing.assert_allclose(aux["ce"][:2], _g(U), rtol=1e-6)


def test_ig_sum_norm_closed_form_and_madry():
  m, beta = 200, 0.4
  x, y = jnp.asarray(X), jnp.asarray(LABELS)
  hyper = dict(epsilon=EPS, step_size=EPS / 4, num_steps=20, m=m,
               approx_factor=2, **NO_BOX)
  # The cross-entropy term leads every start to d*: no restarts needed.
  loss, _ = objectives.ig_sum_norm(_linear_apply, jnp.asarray(W), x, y,
                                   key=jax.random.key(2), lam=beta, **hyper)
  np.testing.assert_allclose(
      loss, (1 + beta) * _g(U + V_STAR) - beta * _g(U), rtol=2e-3)
  zero_beta, _ = objectives.ig_sum_norm(_linear_apply, jnp.asarray(W), x, y,
                                        key=jax.random.key(2), lam=0.0, **hyper)
  madry, aux = objectives.madry(_linear_apply, jnp.asarray(W), x, y,
                                key=jax.random.key(2), **hyper)
  np.testing.assert_allclose(madry, _g(U + V_STAR), rtol=1e-5)
  np.testing.assert_allclose(zero_beta, madry, rtol=1e-6)
  np.testing.assert_allclose(
      aux["adv_inputs"] - x, -Y_PM[:, None] * EPS * np.sign(W)[None, :],
      atol=1e-6)


# --- Identities on a small nonlinear network.


def _cnn_params(key):
  k1, k2 = jax.random.split(key)
  return {"conv": 0.5 * jax.random.normal(k1, (3, 3, 1, 4)),
          "dense": 0.3 * jax.random.normal(k2, (8 * 8 * 4, 3))}


def _cnn_apply(params, x):
  h = jax.lax.conv_general_dilated(x, params["conv"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jax.nn.softplus(h)
  return h.reshape(h.shape[0], -1) @ params["dense"]


def _cnn_batch(n):
  # One compiled program, not one threefry kernel per draw (runtime.run_once).
  params, x = runtime.run_once(
      lambda k1, k2: (_cnn_params(k1), jax.random.uniform(k2, (n, 8, 8, 1))),
      jax.random.key(3), jax.random.key(4))
  y = jnp.array([0, 1, 2, 1] * (n // 4))
  return params, x, y


@pytest.fixture(scope="module")
def cnn_batch():
  return _cnn_batch(4)


HYPER = dict(epsilon=0.1, step_size=0.03, num_steps=5, m=20, approx_factor=5)


def test_sum_regulariser_with_lambda_one_is_madry(cnn_batch):
  params, x, y = cnn_batch
  madry, aux = objectives.madry(_cnn_apply, params, x, y,
                                key=jax.random.key(5), **HYPER)
  x_star = aux["adv_inputs"]
  # Completeness: l(x) + sum(IG(x, x*)) = l(x*), with a fine Riemann sum.
  ig = objectives._loss_ig(_cnn_apply, params, x, y, x_star, 2000)
  robust = aux["ce"] + jnp.sum(ig, axis=(1, 2, 3))
  np.testing.assert_allclose(robust, madry, rtol=1e-3)


def test_ig_norm_with_lambda_zero_is_natural(cnn_batch):
  params, x, y = cnn_batch
  key = jax.random.key(6)
  nat = lambda p: objectives.loss("natural", _cnn_apply, p, x, y, key=key)[0]
  ign = lambda p: objectives.loss("ig_norm", _cnn_apply, p, x, y, key=key,
                                  lam=0.0, **HYPER)[0]
  np.testing.assert_allclose(ign(params), nat(params), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               jax.grad(ign)(params), jax.grad(nat)(params))


def _fixed_point_loss(name, p, x, y, x_star, lam, gamma):
  """Each objective's summed loss written out at a constant attack point."""
  ce = lambda z: cross_entropy(_cnn_apply(p, z), y)
  ig_norm = lambda: jnp.sum(jnp.abs(objectives._loss_ig(
      _cnn_apply, p, x, y, x_star, HYPER["m"])), axis=(1, 2, 3))
  if name == "madry":
    return jnp.sum(ce(x_star))
  if name == "trades":
    log_p = jax.nn.log_softmax(_cnn_apply(p, x))
    log_q = jax.nn.log_softmax(_cnn_apply(p, x_star))
    return jnp.sum(ce(x) + lam * jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1))
  if name == "ig_norm":
    return jnp.sum(ce(x) + lam * ig_norm())
  if name == "ig_sum_norm":
    return jnp.sum(ce(x_star) + lam * ig_norm())
  assert name == "ig_wasserstein"
  return jnp.sum(ce(x) + lam * (ig_norm() - gamma * jnp.sum(
      (x_star - x) ** 2, axis=(1, 2, 3))))


@pytest.mark.parametrize("name", sorted(set(OBJECTIVES) - {"natural"}))
def test_outer_gradient_differentiates_through_ig_with_x_star_constant(
    name, cnn_batch):
  """The parameter gradient is that of the loss at the attack's point held
  constant (through IG, for the IG objectives: double back-propagation),
  every outer term differentiated."""
  params, x, y = cnn_batch
  key, lam, gamma = jax.random.key(7), 0.7, 1.0
  grad, aux = jax.grad(
      lambda p: objectives.loss(name, _cnn_apply, p, x, y, key=key,
                                lam=lam, gamma=gamma, **HYPER),
      has_aux=True)(params)
  x_star = aux["adv_inputs"]
  fixed = lambda p: _fixed_point_loss(name, p, x, y, x_star, lam, gamma)
  np.testing.assert_allclose(aux["loss"].sum(), fixed(params), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               grad, jax.grad(fixed)(params))
  assert float(jnp.max(jnp.abs(grad["conv"]))) > 0


@pytest.mark.parametrize("name", sorted(set(OBJECTIVES) - {"natural"}))
def test_the_parameter_gradient_leaves_the_attack_loop_alone(name,
                                                            find_eqns):
  """The parameter gradient leaves the attack's loop as the loss traces it.

  The attack's point is a constant of the outer loss. Linearised in the
  parameters, the loop carried its loop-invariant values as hoisted
  constants (on the MNIST CNN, 521 MiB through IG-NORM's PGD loop in XLA's
  program), and the training steps ran longer (BUILD.md, Performance, item
  10).
  """
  init_fn, apply_fn, _ = models.make_apply_fns("tiny_cnn", num_classes=10)
  x, y = jnp.full((2, 28, 28, 1), 0.5), jnp.array([3, 7])
  params = jax.eval_shape(init_fn, jax.random.key(0), x)
  steps = 7                              # no IG scan has this length
  run = lambda p: objectives.loss(name, apply_fn, p, x, y,
                                  key=jax.random.key(1), lam=0.5, gamma=1.0,
                                  **dict(HYPER, num_steps=steps))[0]

  def attack_loops(fn):
    """(constants, body equations) of each scan of `steps` steps."""
    return [(e.params["num_consts"], len(e.params["jaxpr"].jaxpr.eqns))
            for e in find_eqns(fn, params) if e.params["length"] == steps]

  alone = attack_loops(run)
  assert len(alone) == 1
  assert attack_loops(jax.grad(run)) == alone


def test_inner_ig_uses_every_approx_factor_th_point(cnn_batch):
  params, x, y = cnn_batch
  x_adv = jnp.clip(x + 0.05, 0, 1)
  # Points {c, 2c, ..., m} / m are the right Riemann points of m / c steps.
  m, c = 20, 5
  f = lambda z: cross_entropy(_cnn_apply(params, z), y)
  gf = jax.grad(lambda z: jnp.sum(f(z)))
  manual = sum(gf(x + (k / m) * (x_adv - x)) for k in range(c, m + 1, c))
  manual = (x_adv - x) * manual / (m // c)
  np.testing.assert_allclose(
      objectives._loss_ig(_cnn_apply, params, x, y, x_adv, m // c), manual,
      rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["ig_norm", "ig_sum_norm", "ig_wasserstein"])
def test_unrolled_inner_ig_gives_the_scan_results(name, monkeypatch,
                                                  count_eqns):
  """On CPU with chunks, the inner maximisation traces IG's chunks one by
  one; the adversarial points, the loss and its parameter gradient are those
  of the scan form. The outer IG (m points) keeps its scan."""
  if jax.default_backend() != "cpu":
    pytest.skip("the inner IG unrolls its chunks on CPU only")
  params, x, y = _cnn_batch(32)
  hyper = dict(HYPER, lam=0.5, gamma=1.0)   # inner: 4 points, 2 per chunk
  assert attribution.unrolled_chunk_size(32, 4) == 2

  def results():
    # A new function each time: JAX caches traces by function.
    run = lambda p: objectives.loss(name, _cnn_apply, p, x, y,
                                    key=jax.random.key(9), **hyper)
    return jax.jit(jax.grad(run, has_aux=True))(params), count_eqns(
        run, params)

  calls, ig = [], objectives.integrated_gradients

  def spy(*args, **kwargs):
    calls.append((args[1].shape[0], kwargs["num_steps"],
                  kwargs.get("chunk_size", "auto"),
                  kwargs.get("unroll_chunks", False)))
    return ig(*args, **kwargs)

  monkeypatch.setattr(objectives, "integrated_gradients", spy)
  unrolled, unrolled_scans = results()
  # The inner IG: 4 points in 2 unrolled chunks; the outer: "auto", a scan.
  assert set(calls) == {(32, 4, 2, True), (32, 20, "auto", False)}
  monkeypatch.setattr(objectives, "integrated_gradients",
                      lambda *a, **k: ig(*a, **dict(k, unroll_chunks=False)))
  scanned, scans = results()
  # The PGD loop and the outer IG; the inner IG's forward and transposed
  # scans come on top without unrolling.
  assert (unrolled_scans, scans) == (2, 4)
  np.testing.assert_allclose(unrolled[1]["adv_inputs"],
                             scanned[1]["adv_inputs"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(unrolled[1]["loss"], scanned[1]["loss"],
                             rtol=1e-6)
  chex.assert_trees_all_close(unrolled[0], scanned[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_runs_jitted_with_the_shared_keywords(name,
                                                              cnn_batch):
  params, x, y = cnn_batch
  hyper = dict(HYPER, lam=0.5, gamma=1.0, clip_min=0.0, clip_max=1.0,
               reduction="mean")
  fn = jax.jit(lambda p, x, y, k: objectives.loss(name, _cnn_apply, p, x, y,
                                                  key=k, **hyper))
  total, aux = fn(params, x, y, jax.random.key(8))
  assert total.shape == ()
  assert bool(jnp.isfinite(total))
  assert set(aux) == {"ce", "adv_ce", "reg", "adv_inputs", "logits", "loss"}
  assert aux["adv_inputs"].shape == x.shape
  assert aux["logits"].shape == (4, 3)
  np.testing.assert_allclose(total, jnp.mean(aux["loss"]), rtol=1e-6)
  if name != "natural":
    assert bool(jnp.all(jnp.abs(aux["adv_inputs"] - x) <= 0.1 + 1e-6)) or \
        name == "ig_wasserstein"
  assert bool(jnp.all((aux["adv_inputs"] >= 0) & (aux["adv_inputs"] <= 1)))


def test_reductions():
  v = jnp.array([1.0, 2.0, 3.0])
  assert float(objectives.reduce_loss(v, "sum")) == 6.0
  assert float(objectives.reduce_loss(v, "mean")) == 2.0


def test_trades_regulariser_is_the_kl_and_vanishes_at_zero_epsilon(cnn_batch):
  params, x, y = cnn_batch
  loss, aux = objectives.trades(_cnn_apply, params, x, y, key=None,
                                epsilon=0.0, step_size=0.01, num_steps=2,
                                lam=3.0)
  np.testing.assert_allclose(aux["reg"], 0.0, atol=1e-6)
  np.testing.assert_allclose(loss, aux["ce"], rtol=1e-6)
  loss, aux = objectives.trades(_cnn_apply, params, x, y,
                                key=jax.random.key(9), lam=3.0, **HYPER)
  assert bool(jnp.all(aux["reg"] > 0))
  np.testing.assert_allclose(loss, aux["ce"] + 3.0 * aux["reg"], rtol=1e-6)


def test_ig_wasserstein_penalty_keeps_the_point_close(cnn_batch):
  params, x, y = cnn_batch
  kw = dict(epsilon=0.01, step_size=0.02, num_steps=10, m=10, approx_factor=2,
            lam=1.0, **NO_BOX)
  _, weak = objectives.ig_wasserstein(_cnn_apply, params, x, y,
                                      key=jax.random.key(10), gamma=0.1, **kw)
  _, strong = objectives.ig_wasserstein(_cnn_apply, params, x, y,
                                        key=jax.random.key(10), gamma=100.0,
                                        **kw)
  dist = lambda a: float(jnp.sum((a["adv_inputs"] - x) ** 2))
  assert dist(strong) < dist(weak)
  # The penalised supremum is at least its value at the natural point (0).
  assert bool(jnp.all(weak["reg"] > 0))


@pytest.mark.parametrize("name, kwargs, match", [
    ("ig_norm", dict(epsilon=-0.3), r"epsilon=-0.3"),
    ("madry", dict(step_size=0), r"step_size=0 .* > 0"),
    ("ig_norm", dict(approx_factor=7), r"approx_factor=7 .* divides m.*"
     r"\[1, 2, 4, 5, 10, 20\]"),
    ("ig_sum_norm", dict(m=0), r"m=0"),
    ("ig_norm", dict(lam=-1.0), r"lam=-1.0"),
    ("ig_norm", dict(reduction="max"), r"reduction 'max'; accepted: sum, mean"),
    ("madry", dict(epsilom=0.3), r"Unknown hyper-parameter\(s\) \['epsilom'\]"),
    ("ig_norm", dict(lam=None), r"needs the hyper-parameter\(s\) \['lam'\]"),
    ("ig_wasserstein", dict(gamma=None), r"\['gamma'\]"),
    ("ig_normm", {}, r"Unknown objective 'ig_normm'; accepted: natural, "
     r"madry, trades, ig_norm"),
])
def test_bad_hyper_parameters_raise(name, kwargs, match, cnn_batch):
  params, x, y = cnn_batch
  hyper = dict(HYPER, lam=1.0, gamma=1.0)
  hyper.update(kwargs)
  with pytest.raises(ValueError, match=match):
    objectives.loss(name, _cnn_apply, params, x, y, key=jax.random.key(0),
                    **hyper)


def test_objectives_dict_is_the_single_name_table():
  assert set(OBJECTIVES) == {"natural", "madry", "trades", "ig_norm",
                             "ig_sum_norm", "ig_wasserstein"}
  assert objectives.get_objective("madry") is objectives.madry


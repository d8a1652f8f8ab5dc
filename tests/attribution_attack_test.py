"""Tests of rar_jax.attacks.attribution_attack on a small trained MNIST CNN."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rar_jax import metrics
from rar_jax import models
from rar_jax import runtime
from rar_jax import attacks
from rar_jax.attacks import attribution_attack, saliency_fn
from rar_jax.data import load_embedded_mnist


def _init(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
      "conv1": 0.3 * jax.random.normal(k1, (3, 3, 1, 8)),
      "conv2": 0.15 * jax.random.normal(k2, (3, 3, 8, 16)),
      "dense": 0.05 * jax.random.normal(k3, (7 * 7 * 16, 10)),
  }


def _apply(params, x, act=jax.nn.relu):
  # rar_jax's convolution and pool: lax's values and derivatives, with
  # gradients that stay fast inside the attack's loops on CPU.
  conv = functools.partial(models.conv_general_dilated, window_strides=(1, 1),
                           padding="SAME",
                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = models.max_pool_2x2(act(conv(x, params["conv1"])))
  h = models.max_pool_2x2(act(conv(h, params["conv2"])))
  return h.reshape(h.shape[0], -1) @ params["dense"]


_surrogate = functools.partial(_apply, act=jax.nn.softplus)


@pytest.fixture(scope="module")
def trained():
  """A natural ReLU CNN, ~95% accurate on the embedded sample (seconds)."""
  x_train, y_train = load_embedded_mnist("train")
  x_test, y_test = load_embedded_mnist("test")
  # One program, compiled without LLVM optimisation: eagerly, each random
  # draw compiles its own threefry kernel, 9 s for these three.
  params = runtime.run_once(_init, jax.random.key(0))
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        _apply(p, x), y).mean())(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(0)
  for _ in range(150):
    idx = rng.choice(len(x_train), 64, replace=False)
    params, state = step(params, state, x_train[idx], y_train[idx])
  acc = float(jnp.mean(jnp.argmax(_apply(params, x_test), -1) == y_test))
  assert acc > 0.85, acc
  return params, jnp.asarray(x_test[:12]), jnp.asarray(y_test[:12])


ATTACK = dict(epsilon=0.3, step_size=0.02, num_steps=12, k_top=60, eval_k=50,
              num_ig_steps=16, surrogate_apply_fn=_surrogate)


@functools.lru_cache(maxsize=None)
def _jitted(**kw):
  """One compiled attack per option set, reused across calls and shapes."""
  return jax.jit(functools.partial(attribution_attack, _apply, **kw))


def _attack(params, x, y, **kw):
  kw = dict(ATTACK, **kw)
  key = kw.pop("key", None)
  return _jitted(**kw)(params, x, y, key=key)


def _check_constraints(params, x, y, out, epsilon=0.3):
  adv = out["adv_inputs"]
  assert adv.shape == x.shape
  assert float(jnp.max(jnp.abs(adv - x))) <= epsilon + 1e-6
  assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
  attacked = np.asarray(out["attacked"])
  pred = np.asarray(jnp.argmax(_apply(params, adv), -1))
  # Never a label-changing input.
  np.testing.assert_array_equal(pred[attacked], np.asarray(y)[attacked])
  tau = np.asarray(out["kendall_tau"])
  assert np.all(tau[attacked] <= 1.0 + 1e-6)
  assert np.all(np.isnan(tau[~attacked]))
  found = np.asarray(out["found"])
  assert np.all(tau[found] < 1.0)
  # No admissible improvement: the image itself and (1, 1, 1).
  keep = attacked & ~found
  np.testing.assert_array_equal(np.asarray(adv)[keep], np.asarray(x)[keep])
  for name in ("topk_intersection", "spearman_rho", "kendall_tau"):
    np.testing.assert_allclose(np.asarray(out[name])[keep], 1.0, atol=1e-6)


def test_topk_attack_lowers_intersection_for_a_natural_model(trained):
  params, x, y = trained
  out = _attack(params, x, y)
  _check_constraints(params, x, y, out)
  attacked = np.asarray(out["attacked"])
  assert attacked.sum() >= 10
  assert np.asarray(out["found"])[attacked].mean() > 0.8
  mean_in = float(np.nanmean(out["topk_intersection"]))
  assert mean_in < 0.75, mean_in
  assert float(np.nanmean(out["kendall_tau"])) < 0.9
  # The reported numbers are those of the returned images.
  measure = jax.jit(lambda z: saliency_fn(_apply, params, y,
                                          num_ig_steps=16)(z))
  s_clean, s_adv = measure(x), measure(out["adv_inputs"])
  np.testing.assert_allclose(out["clean_saliency"], s_clean, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(
      np.asarray(out["kendall_tau"])[attacked],
      np.asarray(metrics.kendall_tau(s_clean, s_adv))[attacked], atol=1e-5)
  np.testing.assert_allclose(
      np.asarray(out["topk_intersection"])[attacked],
      np.asarray(metrics.topk_intersection(s_clean, s_adv, k=50))[attacked],
      atol=1e-6)


def test_batched_attack_equals_one_example_at_a_time(trained):
  params, x, y = trained
  # The batch of the test above (the same compiled program); 3 of its
  # examples attacked one at a time.
  batched = _attack(params, x, y)
  for i in range(3):
    one = _attack(params, x[i:i + 1], y[i:i + 1])
    for name in ("kendall_tau", "topk_intersection", "spearman_rho"):
      np.testing.assert_allclose(batched[name][i], one[name][0], atol=1e-5)
    np.testing.assert_allclose(batched["adv_inputs"][i], one["adv_inputs"][0],
                               atol=1e-6)


def test_attack_chunk_size_rule_and_chunked_attack_agree(trained,
                                                       monkeypatch):
  rule, limit = attacks.attack_chunk_size, attacks.CPU_IMAGES_AT_ONCE
  assert rule(limit // 100, 100, "cpu") == 5           # 20 chunks, unrolled
  assert rule(limit // 100 + 1, 100, "cpu") == 1       # then a scan of 100
  assert rule(4, 100, "cpu") == 10                     # auto: 64 // 4 images
  assert rule(4, 16, "cpu") is None                    # auto: no chunks
  assert rule(300, 100, "gpu") is None and rule(300, 100, "tpu") is None
  params, x, y = trained
  # What "auto" hands every saliency's IG, traced (not compiled): 8 rows of
  # 16 points, 2 chunks of 8, unrolled; past the bound, a scan of 1-point
  # chunks.
  module = importlib.import_module("rar_jax.attacks.attribution_attack")
  calls, ig = set(), module.integrated_gradients

  def spy(*args, **kwargs):
    calls.add((kwargs["chunk_size"], kwargs["unroll_chunks"]))
    return ig(*args, **kwargs)

  monkeypatch.setattr(module, "integrated_gradients", spy)
  for n, steps, expected in ((8, ATTACK["num_ig_steps"], (8, True)),
                             (limit // 100 + 1, 100, (1, False))):
    calls.clear()
    jax.make_jaxpr(functools.partial(
        attribution_attack, _apply, **dict(ATTACK, num_ig_steps=steps)))(
            params, jnp.zeros((n,) + x.shape[1:]), jnp.zeros(n, jnp.int32))
    assert calls == {expected}
  monkeypatch.undo()
  # "auto" (4 rows: all 16 points at once; 8 rows: 2 unrolled chunks), all
  # at once, and 4-point chunks in a scan: the same attack up to float
  # rounding.
  for n, others in ((4, (4,)), (8, (4, None))):
    auto = _attack(params, x[:n], y[:n])
    for chunk_size in others:
      other = _attack(params, x[:n], y[:n], chunk_size=chunk_size)
      np.testing.assert_allclose(auto["clean_saliency"],
                                 other["clean_saliency"], rtol=1e-5,
                                 atol=1e-6)
      np.testing.assert_allclose(auto["kendall_tau"], other["kendall_tau"],
                                 atol=1e-4)
      np.testing.assert_allclose(auto["adv_inputs"], other["adv_inputs"],
                                 atol=1e-5)


def test_restarts_keep_the_worst_case(trained):
  params, x, y = trained
  # One example at a time, as in the test above: the same two compiled
  # programs for the 3 examples, and the single-run attack is already built.
  attacked = 0
  for i in range(3):
    xi, yi = x[i:i + 1], y[i:i + 1]
    single = _attack(params, xi, yi)
    multi = _attack(params, xi, yi, num_restarts=3, key=jax.random.key(1))
    _check_constraints(params, xi, yi, multi)
    assert bool(multi["attacked"][0]) == bool(single["attacked"][0])
    # Restart 0 is the deterministic attack; the others can only lower tau.
    if bool(single["attacked"][0]):
      attacked += 1
      assert float(multi["kendall_tau"][0]) <= float(
          single["kendall_tau"][0]) + 1e-6
  assert attacked >= 2


@pytest.mark.parametrize("variant", [
    dict(attack="random"), dict(attack="mass_center"),
    dict(attack="target"), dict(saliency="gradient"),
])
def test_other_attacks_respect_the_constraints(trained, variant):
  params, x, y = trained
  kw = dict(ATTACK, num_steps=4, num_ig_steps=8, **variant)
  if variant.get("attack") == "target":
    kw["target_mask"] = jnp.zeros((28, 28)).at[:10, :10].set(1.0)
  # Jitted: one compiled program (run eagerly, each small op compiles on its
  # own, which is most of the time on a 2-core CI machine).
  attack = jax.jit(functools.partial(attribution_attack, _apply, **kw))
  out = attack(params, x[:6], y[:6], key=jax.random.key(2))
  _check_constraints(params, x[:6], y[:6], out)
  assert bool(jnp.any(out["found"]))


def test_quantized_attack_on_a_0_255_model(trained):
  params, x, y = trained
  apply255 = lambda p, z: _apply(p, z / 255.0)
  x255 = jnp.round(x[:4] * 255.0)
  attack = jax.jit(functools.partial(
      attribution_attack, apply255, epsilon=8.0, step_size=1.0, num_steps=3,
      k_top=60, num_ig_steps=8, clip_min=0.0, clip_max=255.0, quantize=True,
      surrogate_apply_fn=lambda p, z: _surrogate(p, z / 255.0)))
  out = attack(params, x255, y[:4])
  adv = np.asarray(out["adv_inputs"])
  np.testing.assert_array_equal(adv, np.trunc(adv))
  assert np.abs(adv - np.asarray(x255)).max() <= 8.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(k_top=785), r"k_top=785 .* 1 <= k_top <= 784"),
    (dict(eval_k=0), r"eval_k=0"),
    (dict(attack="topk2"), r"Unknown attack 'topk2'; accepted: topk, "
     r"mass_center, target, random"),
    (dict(saliency="smooth"), r"Unknown saliency 'smooth'"),
    (dict(num_restarts=3), r"needs a PRNG key"),
    (dict(attack="random"), r"needs a PRNG key"),
    (dict(attack="target"), r"needs target_mask"),
    (dict(attack="target", target_mask=jnp.ones((5, 5))),
     r"target_mask of shape \(5, 5\)"),
    (dict(epsilon=-1.0), r"epsilon=-1.0"),
    (dict(num_steps=0), r"num_steps=0"),
])
def test_bad_arguments_raise(trained, kwargs, match):
  params, x, y = trained
  kw = dict(ATTACK)
  kw.update(kwargs)
  with pytest.raises(ValueError, match=match):
    attribution_attack(_apply, params, x[:2], y[:2], **kw)


def test_mismatched_labels_raise(trained):
  params, x, y = trained
  with pytest.raises(ValueError, match=r"labels of shape \(3,\)"):
    attribution_attack(_apply, params, x[:2], y[:3], **ATTACK)

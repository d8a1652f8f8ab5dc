"""Tests for rar_jax.models: shapes, parameter counts, init, activations."""

import functools
import math
from unittest import mock

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rar_jax import models
from rar_jax import runtime

# RBG keys compile far faster than threefry on CPU; the library is agnostic.
_KEY = jax.random.key(0, impl="rbg")
_RNG = np.random.default_rng(0)


@pytest.fixture(scope="module", name="tiny")
def _tiny_models():
  """name -> (init_fn, apply_fn, surrogate_fn, params, inputs), built once."""
  out = {}
  for name, shape, scale in (("tiny_cnn", (2, 12, 12, 1), 1.0),
                             ("tiny_resnet", (2, 8, 8, 3), 255.0)):
    init_fn, apply_fn, surrogate_fn = models.make_apply_fns(
        name, num_classes=3)
    inputs = jnp.asarray(_RNG.uniform(size=shape) * scale, jnp.float32)
    params = runtime.run_once(init_fn, _KEY, inputs)
    out[name] = (init_fn, jax.jit(apply_fn), jax.jit(surrogate_fn), params,
                 inputs)
  return out


def _cnn_param_count(in_channels, conv_features, kernel, dense, num_classes,
                     image_side):
  c1, c2 = conv_features
  side = math.ceil(math.ceil(image_side / 2) / 2)  # Two SAME 2x2/2 pools.
  return ((kernel * kernel * in_channels * c1 + c1)
          + (kernel * kernel * c1 * c2 + c2)
          + (side * side * c2 * dense + dense)
          + (dense * num_classes + num_classes))


def _resnet_param_count(units, stem, stages, num_classes, in_channels=3):
  count = 9 * in_channels * stem  # Stem conv, no bias.
  in_features = stem
  for features in stages:
    for _ in range(units):
      count += 9 * in_features * features + 9 * features * features
      in_features = features
  return count + in_features * num_classes + num_classes


_CASES = {  # name: (input shape, num_classes, hand-computed parameter count)
    "mnist_cnn": ((2, 28, 28, 1), 10,
                  _cnn_param_count(1, (32, 64), 5, 1024, 10, 28)),
    "small_cnn": ((2, 28, 28, 1), 10,
                  _cnn_param_count(1, (16, 32), 3, 128, 10, 28)),
    "tiny_cnn": ((2, 12, 12, 1), 3, _cnn_param_count(1, (2, 4), 3, 8, 3, 12)),
    "resnet_gtsrb": ((2, 32, 32, 3), 43,
                     _resnet_param_count(2, 16, (16, 32, 64), 43)),
    "resnet_flower": ((2, 128, 128, 3), 17,
                      _resnet_param_count(1, 16, (16, 32, 64), 17)),
    "tiny_resnet": ((2, 8, 8, 3), 5, _resnet_param_count(1, 2, (2, 4, 8), 5)),
}


def _num_params(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_hand_formulas_match_the_paper_counts():
  # 832 + 51,264 + 3,212,288 + 10,250.
  assert _CASES["mnist_cnn"][2] == 3_274_634
  assert _CASES["resnet_gtsrb"][2] == 173_723
  assert _CASES["resnet_flower"][2] == 75_265


@pytest.mark.parametrize("name", sorted(_CASES))
def test_output_shape_and_param_count(name):
  shape, num_classes, expected = _CASES[name]
  init_fn, apply_fn, surrogate_fn = models.make_apply_fns(
      name, num_classes=num_classes)
  inputs = jax.ShapeDtypeStruct(shape, jnp.float32)
  params = jax.eval_shape(init_fn, _KEY, inputs)  # Shapes only, no compute.
  assert _num_params(params) == expected
  for fn in (apply_fn, surrogate_fn):
    logits = jax.eval_shape(fn, params, inputs)
    assert logits.shape == (shape[0], num_classes)
    assert logits.dtype == jnp.float32


def test_mnist_cnn_init_statistics():
  init_fn, _, _ = models.make_apply_fns("mnist_cnn", num_classes=10)
  params = runtime.run_once(init_fn, _KEY, jnp.zeros((1, 28, 28, 1)))
  assert set(params) == {"conv1", "conv2", "fc1", "fc2"}
  for layer in params.values():
    np.testing.assert_array_equal(layer["bias"], np.float32(0.1))
  # truncated_normal(0.1): N(0, 0.1^2) cut at +-0.2, std 0.1 * 0.87963.
  kernel = np.asarray(params["fc1"]["kernel"])  # 3.2M samples.
  assert np.abs(kernel).max() <= 0.2
  assert abs(kernel.mean()) < 1e-3
  np.testing.assert_allclose(kernel.std(), 0.087963, rtol=0.01)
  conv2 = np.asarray(params["conv2"]["kernel"])
  np.testing.assert_allclose(conv2.std(), 0.087963, rtol=0.05)


def test_resnet_init_statistics():
  init_fn, _, _ = models.make_apply_fns("resnet_gtsrb", num_classes=43)
  params = runtime.run_once(init_fn, _KEY, jnp.zeros((1, 32, 32, 3)))
  assert set(params) == {"init_conv", "logit"} | {
      f"unit_{s}_{u}" for s in (1, 2, 3) for u in (0, 1)}
  conv = np.asarray(params["unit_3_1"]["conv2"]["kernel"])  # [3,3,64,64].
  assert set(params["unit_3_1"]["conv2"]) == {"kernel"}  # No conv bias.
  np.testing.assert_allclose(conv.std(), np.sqrt(2 / (9 * 64)), rtol=0.03)
  assert np.abs(conv).max() > 3 * np.sqrt(2 / (9 * 64))  # Not truncated.
  fc = np.asarray(params["logit"]["kernel"])  # [64, 43], U(+-sqrt(3/64)).
  bound = np.sqrt(3 / 64)
  assert np.abs(fc).max() <= bound
  assert np.abs(fc).max() > 0.9 * bound
  np.testing.assert_array_equal(params["logit"]["bias"], 0.0)


@pytest.mark.parametrize("name,activations", [
    ("tiny_cnn", ("relu", "softplus")),
    ("tiny_resnet", ("leaky_relu", "leaky_softplus")),
])
def test_activations_share_params_and_differ(tiny, name, activations):
  _, apply_fn, surrogate_fn, params, inputs = tiny[name]
  relu_model = models.get_model(name, num_classes=3,
                                activation=activations[0])
  smooth_model = models.get_model(name, num_classes=3,
                                  activation=activations[1])
  # Both activations give the same parameter structure...
  chex.assert_trees_all_equal_shapes_and_dtypes(
      jax.eval_shape(relu_model.init, _KEY, inputs),
      jax.eval_shape(smooth_model.init, _KEY, inputs))
  # ...and parameters initialised with one apply with the other.
  relu_out = jax.jit(relu_model.apply)({"params": params}, inputs)
  smooth_out = jax.jit(smooth_model.apply)({"params": params}, inputs)
  assert not np.allclose(relu_out, smooth_out, rtol=1e-3)
  # make_apply_fns gives the same pair by default.
  np.testing.assert_allclose(apply_fn(params, inputs), relu_out, rtol=1e-5)
  np.testing.assert_allclose(surrogate_fn(params, inputs), smooth_out,
                             rtol=1e-5)


def test_activation_functions():
  x = jnp.array([-30.0, -1.0, 0.0, 2.0, 30.0])
  np.testing.assert_allclose(models.leaky_relu(x), [-3.0, -0.1, 0.0, 2.0, 30.0])
  np.testing.assert_allclose(
      models.leaky_softplus(x), 0.1 * x + 0.9 * np.log1p(np.exp(x)),
      rtol=1e-6)
  # The surrogate converges to the original away from 0 (|x| >= 30).
  far = jnp.array([-30.0, 30.0])
  np.testing.assert_allclose(models.leaky_softplus(far),
                             models.leaky_relu(far), atol=1e-6)
  np.testing.assert_allclose(jax.nn.softplus(far), jax.nn.relu(far),
                             atol=1e-6)
  # TF's leaky ReLU gradient at 0 is 1 (tf.where(x < 0, ...)).
  assert jax.grad(models.leaky_relu)(0.0) == 1.0


def _relative_gap(apply_fn, surrogate_fn, params, inputs):
  a, b = apply_fn(params, inputs), surrogate_fn(params, inputs)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))


def test_surrogate_close_to_original_at_large_scale(tiny):
  # Without biases both nets are positively homogeneous in the pre-activation
  # scale; softplus(z) - relu(z) <= log 2 absolutely, so the relative gap
  # shrinks like 1/scale.
  _, apply_fn, surrogate_fn, params, inputs = tiny["tiny_cnn"]
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if path[-1].key == "bias" else x,
      params)
  gaps = [_relative_gap(apply_fn, surrogate_fn, params, s * inputs)
          for s in (1.0, 1e2, 1e4)]
  assert gaps[0] > gaps[1] > gaps[2]
  assert gaps[2] < 1e-3

  # ResNet: inputs are standardised, so scale the stem kernel instead.
  _, apply_fn, surrogate_fn, params, inputs = tiny["tiny_resnet"]

  def scaled(s):
    kernel = s * params["init_conv"]["kernel"]
    return {**params, "init_conv": {"kernel": kernel}}

  gaps = [_relative_gap(apply_fn, surrogate_fn, scaled(s), inputs)
          for s in (1.0, 1e2, 1e4)]
  assert gaps[0] > gaps[1] > gaps[2]
  assert gaps[2] < 1e-3


def test_resnet_is_scale_invariant(tiny):
  _, apply_fn, surrogate_fn, params, inputs = tiny["tiny_resnet"]
  for fn in (apply_fn, surrogate_fn):
    reference = fn(params, inputs)
    for c in (0.01, 0.5, 3.0):
      np.testing.assert_allclose(fn(params, c * inputs), reference,
                                 rtol=1e-4, atol=1e-5)


def test_per_image_standardization_matches_tf_formula():
  x = _RNG.uniform(size=(3, 4, 5, 3)).astype(np.float32) * 255
  x[2] = 7.0  # A uniform image: std floored at 1/sqrt(60).
  x = jnp.asarray(x)
  xs = np.asarray(x, np.float64)
  mean = xs.mean(axis=(1, 2, 3), keepdims=True)
  var = np.maximum((xs**2).mean(axis=(1, 2, 3), keepdims=True) - mean**2, 0)
  expected = (xs - mean) / np.maximum(np.sqrt(var), 1 / np.sqrt(60))
  np.testing.assert_allclose(models.per_image_standardization(x), expected,
                             rtol=1e-4, atol=1e-4)
  # The uniform image has a finite (zero) gradient, not NaN.
  grad = jax.grad(lambda x: models.per_image_standardization(x)[2].sum())(x)
  assert np.all(np.isfinite(grad))


def test_max_pool_gradient_goes_to_first_maximum():
  x = jnp.array([[1.0, 1.0, 0.0, 2.0],
                 [1.0, 0.0, 2.0, 2.0],
                 [3.0, 0.0, 5.0, 4.0],
                 [0.0, 3.0, 4.0, 5.0]])[None, :, :, None]
  grad = jax.grad(lambda x: models.max_pool_2x2(x).sum())(x)[0, :, :, 0]
  np.testing.assert_array_equal(grad, [[1, 0, 0, 1],
                                       [0, 0, 0, 0],
                                       [1, 0, 1, 0],
                                       [0, 0, 0, 0]])
  # SAME padding on odd sizes: 5x5 -> 3x3.
  assert models.max_pool_2x2(jnp.zeros((1, 5, 5, 2))).shape == (1, 3, 3, 2)


@pytest.mark.parametrize("shape", [(4, 28, 28, 1), (2, 27, 27, 3),
                                   (1, 7, 9, 2)])
def test_max_pool_equals_reduce_window_values_and_gradients(shape):
  # Quantised values make ties common, as on MNIST.
  rng = np.random.default_rng(0)
  x = np.round(4 * rng.uniform(size=shape)).astype(np.float32) / 4
  ref = lambda z: flax.linen.max_pool(z, (2, 2), strides=(2, 2),
                                      padding="SAME")
  np.testing.assert_array_equal(models.max_pool_2x2(x), ref(x))
  w = rng.standard_normal(ref(x).shape).astype(np.float32)
  # Jitted: eagerly, every op of the gradient compiles on its own.
  grad = lambda pool: jax.jit(jax.grad(lambda z: jnp.sum(w * pool(z))))(x)
  np.testing.assert_array_equal(grad(models.max_pool_2x2), grad(ref))


@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_resnet"])
def test_second_order_gradients_are_finite(tiny, name):
  # The IG objectives differentiate (w.r.t. params and inputs) through an
  # input gradient: grad of a function of grad_x, for both activations.
  _, apply_fn, surrogate_fn, params, inputs = tiny[name]
  labels = jnp.array([0, 2])

  def input_grad_norm(params, x):
    total = 0.0
    for fn in (apply_fn, surrogate_fn):
      def loss(x, fn=fn):
        log_probs = jax.nn.log_softmax(fn(params, x))
        return -jnp.sum(log_probs[jnp.arange(2), labels])
      total += jnp.sum(jnp.abs(jax.grad(loss)(x) * x))
    return total

  grad_params, grad_x = jax.jit(jax.grad(input_grad_norm, argnums=(0, 1)))(
      params, inputs)
  leaves = jax.tree.leaves(grad_params)
  assert all(np.all(np.isfinite(g)) for g in leaves + [grad_x])
  assert float(jnp.abs(grad_x).sum()) > 0
  assert all(float(jnp.abs(g).sum()) > 0 for g in leaves)


def test_overrides_and_presets():
  model = models.get_model("small_cnn", num_classes=7, conv_features=(4, 8))
  assert isinstance(model, models.MnistCNN)
  assert tuple(model.conv_features) == (4, 8)
  assert model.kernel_size == 3 and model.num_classes == 7
  flower = models.get_model("resnet_flower", num_classes=17)
  assert flower.num_units_per_stage == 1
  assert flower.activation == "leaky_relu"


def test_unknown_names_raise():
  with pytest.raises(ValueError, match="Unknown model name 'vgg'.*mnist_cnn"):
    models.get_model("vgg", num_classes=10)
  with pytest.raises(ValueError, match="Unknown model name.*tiny_resnet"):
    models.make_apply_fns("resnet", num_classes=10)
  with pytest.raises(ValueError, match="Unknown activation 'tanh'.*softplus"):
    models.get_model("tiny_cnn", num_classes=10, activation="tanh")
  with pytest.raises(ValueError, match="Unknown override.*'depth'"):
    models.get_model("tiny_cnn", num_classes=10, depth=3)
  with pytest.raises(ValueError, match="Unknown activation 'gelu'"):
    model = models.get_model("tiny_cnn", num_classes=2).clone(
        activation="gelu")
    jax.eval_shape(model.init, _KEY, jnp.zeros((1, 4, 4, 1)))


def test_odd_channel_difference_raises():
  model = models.get_model("tiny_resnet", num_classes=2,
                           stage_features=(2, 5, 8))
  with pytest.raises(ValueError, match="in=2, out=5"):
    jax.eval_shape(model.init, _KEY, jnp.zeros((1, 8, 8, 3)))


_DN = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, k, strides, padding):
  return jax.lax.conv_general_dilated(x, k, strides, padding,
                                      dimension_numbers=_DN)


def _fast_conv(x, k, strides, padding):
  return models.conv_general_dilated(x, k, strides, padding,
                                     dimension_numbers=_DN)


@pytest.mark.parametrize("kernel,strides,padding", [
    ((5, 5), (1, 1), "SAME"),            # the MNIST CNN's convs
    ((3, 3), (1, 1), "SAME"),            # the ResNets' stride-1 convs
    ((2, 3), (1, 1), "SAME"),            # even size: asymmetric pads
    ((3, 3), (1, 1), "VALID"),
    ((3, 3), (1, 1), ((2, 0), (1, 2))),  # explicit, asymmetric
    ((3, 3), (2, 2), "SAME"),            # stride 2: lax's own path
])
@pytest.mark.parametrize("channels", [(3, 8), (4, 1)])
def test_fast_conv_equals_lax_conv_to_third_order(kernel, strides, padding,
                                                  channels):
  """Values and derivatives to the third order, against float64.

  (4, 1) channels: the input gradient has 4 outputs, a convolution; (3, 8):
  3 outputs from 8 channels, the matmul-and-sums form of
  `_conv_few_outputs`. Both are float32
  computations summed in other orders than lax's, so both are held to the
  float64 result with a tolerance relative to each output's scale, and the
  fast path may not be much less accurate than lax's.
  """
  x = _RNG.normal(size=(2, 7, 6, channels[0]))
  k = _RNG.normal(size=kernel + channels)
  for conv in (_lax_conv, _fast_conv):
    assert conv(x, k, strides, padding).shape == _lax_conv(
        x, k, strides, padding).shape

  def derivatives(conv, dtype):
    xd, kd = jnp.asarray(x, dtype), jnp.asarray(k, dtype)
    f = lambda x, k: jnp.sum(jnp.sin(conv(x, k, strides, padding)))
    gx = lambda x, k: jax.grad(f)(x, k)
    # Second order (the training regulariser: d/dk of the input gradient)
    # and third order (d/dx of a second-order quantity, as in the attack).
    g2 = lambda x, k: jnp.sum(jnp.cos(gx(x, k)))
    g3 = lambda x, k: jnp.sum(jax.grad(g2, argnums=1)(x, k) ** 2)
    return [np.asarray(v, np.float64) for v in jax.jit(lambda: (
        conv(xd, kd, strides, padding), *jax.grad(f, (0, 1))(xd, kd),
        *jax.grad(g2, (0, 1))(xd, kd), *jax.grad(g3, (0, 1))(xd, kd)))()]

  with jax.enable_x64(True):
    exact = derivatives(_lax_conv, jnp.float64)
  fast = derivatives(_fast_conv, jnp.float32)
  # The first-order input gradient takes the matmul form exactly where the
  # rule says: stride 1, 3 outputs from 8 channels.
  with mock.patch.object(models, "_conv_few_outputs",
                         wraps=models._conv_few_outputs) as few:
    jax.make_jaxpr(jax.grad(lambda x: jnp.sum(_fast_conv(
        x, jnp.asarray(k, jnp.float32), strides, padding))))(
            jnp.asarray(x, jnp.float32))
  assert few.called == (channels == (3, 8) and strides == (1, 1))
  plain = derivatives(_lax_conv, jnp.float32)
  for got, ref, want in zip(fast, plain, exact):
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-5 * scale)
    assert (np.abs(got - want).max()
            <= 2 * np.abs(ref - want).max() + 1e-6 * scale)


def test_fast_conv_grad_models_agree_inside_loops(tiny):
  """Same params, same logits, same IG (chunked: a lax.scan) either way."""
  from rar_jax import attribution  # pylint: disable=g-import-not-at-top
  for name, (init_fn, apply_fn, _, params, inputs) in tiny.items():
    _, plain_fn, _ = models.make_apply_fns(name, num_classes=3,
                                           fast_conv_grad=False)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        params, jax.eval_shape(init_fn, _KEY, inputs))
    np.testing.assert_array_equal(apply_fn(params, inputs),
                                  jax.jit(plain_fn)(params, inputs))

    def ig(fn, params):
      f = lambda z: fn(params, z)[:, 0]
      return attribution.integrated_gradients(f, inputs, num_steps=6,
                                              chunk_size=2)

    def reg(fn):
      return jax.grad(lambda p: jnp.sum(jnp.abs(ig(fn, p))))(params)

    fast, plain = jax.jit(lambda: (ig(models.make_apply_fns(
        name, num_classes=3)[1], params), reg(models.make_apply_fns(
            name, num_classes=3)[1])))(), jax.jit(
                lambda: (ig(plain_fn, params), reg(plain_fn)))()
    chex.assert_trees_all_close(fast, plain, rtol=1e-5, atol=1e-6)


def test_forward_mode_needs_plain_convs():
  x = jnp.ones((1, 8, 8, 1))
  for fast in (True, False):
    init_fn, apply_fn, _ = models.make_apply_fns(
        "tiny_cnn", num_classes=3, fast_conv_grad=fast)
    params = runtime.run_once(init_fn, _KEY, x)
    # Jitted (eagerly, every op compiles on its own); the error is raised
    # while tracing either way.
    jvp = jax.jit(lambda: jax.jvp(lambda z: apply_fn(params, z), (x,), (x,)))
    if fast:
      with pytest.raises(TypeError, match="custom_vjp"):
        jvp()
    else:
      assert jvp()[1].shape == (1, 3)


def test_fast_conv_gradients_under_shard_map_match_lax():
  """A replicated kernel and per-device inputs: the gradients of lax's
  convolution and of the whole batch on one device. (JAX sums the gradient
  of the replicated kernel over the devices itself: no psum.)"""
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((jax.device_count(),), ("batch",))
  x = jax.device_put(
      jnp.asarray(_RNG.normal(size=(2 * jax.device_count(), 6, 5, 2)),
                  jnp.float32), NamedSharding(mesh, PartitionSpec("batch")))
  k = jax.device_put(jnp.asarray(_RNG.normal(size=(3, 3, 2, 4)), jnp.float32),
                     NamedSharding(mesh, PartitionSpec()))

  def grads(conv):
    def per_device(x, k):
      f = lambda x, k: jnp.sum(jnp.sin(conv(x, k, (1, 1), "SAME")))
      return jax.grad(f, (0, 1))(x, k)
    return jax.jit(lambda x, k: jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(PartitionSpec("batch"), PartitionSpec()),
        out_specs=(PartitionSpec("batch"), PartitionSpec()))(x, k))(x, k)

  whole = jax.grad(lambda x, k: jnp.sum(jnp.sin(_lax_conv(
      x, k, (1, 1), "SAME"))), (0, 1))(np.asarray(x), np.asarray(k))
  chex.assert_trees_all_close(grads(_fast_conv), grads(_lax_conv), rtol=1e-5,
                              atol=1e-6)
  chex.assert_trees_all_close(grads(_fast_conv), whole, rtol=1e-5, atol=1e-5)


def _one_hot_pool(x):
  """The first-maximum pool written with a stop-gradient one-hot (the
  definition `max_pool_2x2` must agree with, ties included)."""
  n, h, w, c = x.shape
  x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)),
              constant_values=-jnp.inf)
  windows = x.reshape(n, (h + 1) // 2, 2, (w + 1) // 2, 2, c)
  windows = windows.transpose(0, 1, 3, 5, 2, 4).reshape(
      n, (h + 1) // 2, (w + 1) // 2, c, 4)
  first = jax.lax.stop_gradient(
      jax.nn.one_hot(jnp.argmax(windows, axis=-1), 4, dtype=bool))
  return jnp.sum(jnp.where(first, windows, 0.0), axis=-1)


def test_softplus_equals_jax_softplus_to_the_third_derivative():
  x = jnp.linspace(-30.0, 30.0, 241)
  np.testing.assert_array_equal(models.softplus(x), jax.nn.softplus(x))
  s = 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))
  exact = [s, s * (1 - s), s * (1 - s) * (1 - 2 * s)]
  ours, theirs = models.softplus, jax.nn.softplus
  for order in (1, 2, 3):
    ours, theirs = jax.grad(ours), jax.grad(theirs)
    a, b = jax.jit(jax.vmap(ours))(x), jax.jit(jax.vmap(theirs))(x)
    # float32 rounding of s (1 - s) near s = 1: ~2e-7 absolute for both.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                               err_msg=f"order {order}")
    np.testing.assert_allclose(a, exact[order - 1], rtol=1e-5, atol=1e-6,
                               err_msg=f"order {order}")
  # Forward mode as well.
  t = jnp.cos(x)
  np.testing.assert_allclose(
      jax.jvp(models.softplus, (x,), (t,))[1],
      jax.jvp(jax.nn.softplus, (x,), (t,))[1], rtol=1e-6, atol=1e-7)


@functools.partial(jax.jit, static_argnums=0)
def _second_derivative(pool, x, w):
  # A function of the input gradient, differentiated again (as IG-NORM
  # does); smooth around the pool, so the second derivative is not zero.
  # Jitted: eagerly, each of its many small ops compiles on its own.
  inner = lambda z: jnp.sum(w * jnp.sin(pool(z * z)))
  return jax.grad(lambda z: jnp.sum(jnp.cos(jax.grad(inner)(z))))(x)


def test_max_pool_forward_mode_and_second_derivatives():
  ref = lambda z: flax.linen.max_pool(z, (2, 2), strides=(2, 2),
                                      padding="SAME")
  # Without ties: exactly reduce_window's, to second order.
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 9, 8, 3)).astype(np.float32)
  w = rng.standard_normal(ref(x).shape).astype(np.float32)
  np.testing.assert_allclose(_second_derivative(models.max_pool_2x2, x, w),
                             _second_derivative(ref, x, w), rtol=1e-6,
                             atol=1e-6)
  # With ties (quantised pixels): reduce_window's second derivative follows
  # XLA's unspecified order of reduction among tied maxima, so the reference
  # is the stop-gradient one-hot of the first maximum.
  x = np.round(4 * rng.uniform(size=x.shape)).astype(np.float32) / 4
  np.testing.assert_allclose(_second_derivative(models.max_pool_2x2, x, w),
                             _second_derivative(_one_hot_pool, x, w),
                             rtol=1e-6, atol=1e-6)
  t = rng.standard_normal(x.shape).astype(np.float32)
  tangent = lambda pool: jax.jit(lambda z, dz: jax.jvp(pool, (z,), (dz,))[1])
  for other in (ref, _one_hot_pool):
    np.testing.assert_array_equal(tangent(models.max_pool_2x2)(x, t),
                                  tangent(other)(x, t))
  # Batched (as IG evaluates its path points).
  xs = np.stack([x, 2 * x])
  batched = lambda pool: jax.jit(jax.vmap(jax.grad(
      lambda z: jnp.sum(w * pool(z)))))(xs)
  np.testing.assert_array_equal(batched(models.max_pool_2x2), batched(ref))


def test_pool_commuting_activations_commute_with_the_pool():
  # MnistCNN pools their input instead of their output; that is the same
  # network only for activations that never decrease...
  assert models.POOL_COMMUTING_ACTIVATIONS <= set(models.ACTIVATIONS)
  grid = np.concatenate([np.linspace(-100.0, 100.0, 200_001),
                         np.linspace(-1e-3, 1e-3, 2_001)]).astype(np.float32)
  grid = np.unique(grid)
  # ...and whose derivative is 0 where they are flat: on windows with ties,
  # signed zeros and SAME padding, the first-maximum gradients of both
  # orders agree (jax.nn.hard_tanh, which never decreases, fails this).
  rng = np.random.default_rng(5)
  z = np.round(8 * rng.uniform(-1, 1, size=(3, 7, 9, 4))).astype(np.float32)
  z[0, :2, :2] = -0.0
  z[1, :2, :2] = 0.0
  z = jnp.asarray(z / 4)
  w = jnp.asarray(rng.standard_normal((3, 4, 5, 4)), jnp.float32)
  orders = {
      "pool first": lambda act: lambda z: act(models.max_pool_2x2(z)),
      "act first": lambda act: lambda z: models.max_pool_2x2(act(z))}
  grad = lambda f: jax.jit(jax.grad(lambda z: jnp.sum(w * f(z))))(z)
  hard = {k: grad(order(jax.nn.hard_tanh)) for k, order in orders.items()}
  assert not np.allclose(hard["pool first"], hard["act first"])
  for name in sorted(models.POOL_COMMUTING_ACTIVATIONS):
    act = models.get_activation(name)
    y = np.asarray(jax.jit(act)(grid), np.float64)
    # softplus rounds to a non-monotone last bit in places: allow 2 ulps.
    slack = 2 * np.spacing(np.abs(y[1:]).astype(np.float32))
    assert np.all(np.diff(y) >= -slack), name
    grads = {k: grad(order(act)) for k, order in orders.items()}
    assert float(jnp.abs(grads["pool first"]).sum()) > 0, name
    np.testing.assert_allclose(grads["pool first"], grads["act first"],
                               rtol=1e-6, atol=1e-7, err_msg=name)
    if name == "relu":
      np.testing.assert_array_equal(grads["pool first"], grads["act first"])


def _conv_layer(params, layer, x):
  """MnistCNN's `layer` ("conv1", "conv2") before its activation, by lax."""
  return jax.lax.conv_general_dilated(
      x, params[layer]["kernel"], (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + params[layer]["bias"]


def _reference_cnn(params, x, act, pool):
  """MnistCNN as the paper writes it: pool(act(conv(x) + b))."""
  for layer in ("conv1", "conv2"):
    x = pool(act(_conv_layer(params, layer, x)))
  x = act(x.reshape(len(x), -1) @ params["fc1"]["kernel"]
          + params["fc1"]["bias"])
  return x @ params["fc2"]["kernel"] + params["fc2"]["bias"]


@functools.partial(jax.jit, static_argnums=0)
def _cnn_derivatives(apply_fn, params, x, labels):
  """Logits, input and parameter gradients of the cross-entropy, and the
  parameter gradient of `||d CE / dx||_1` (second order, as IG-NORM)."""
  def ce(p, z):
    return -jnp.sum(jnp.take_along_axis(
        jax.nn.log_softmax(apply_fn(p, z)), labels[:, None], -1))
  grad_x = jax.grad(ce, argnums=1)
  return (apply_fn(params, x), grad_x(params, x), jax.grad(ce)(params, x),
          jax.grad(lambda p: jnp.sum(jnp.abs(grad_x(p, x))))(params))


def _tied_windows(z) -> int:
  """Number of 2x2 windows whose maximum is held by several elements."""
  # pylint: disable-next=protected-access
  windows = models._pool_windows(z, -jnp.inf)
  top = jnp.max(windows, axis=(2, 4), keepdims=True)
  return int(jnp.sum(jnp.sum(windows == top, axis=(2, 4)) > 1))


@pytest.mark.parametrize("activation",
                         sorted(models.POOL_COMMUTING_ACTIVATIONS))
def test_mnist_cnn_pooling_before_the_activation_is_the_same_network(
    tiny, activation):
  _, _, _, params, _ = tiny["tiny_cnn"]
  model = models.get_model("tiny_cnn", num_classes=3, activation=activation)
  # Like MNIST: blank regions, where the pre-activations tie exactly (the
  # bias, 0.1 > 0) and the gradient must go to each window's first element.
  rng = np.random.default_rng(3)
  x = np.round(4 * rng.uniform(size=(4, 12, 12, 1))) / 4
  x[0] = 0.0
  x[1, :10, :10] = 0.0
  x = jnp.asarray(x, jnp.float32)
  act = models.get_activation(activation)
  z1 = _conv_layer(params, "conv1", x)
  z2 = _conv_layer(params, "conv2", models.max_pool_2x2(act(z1)))
  assert _tied_windows(z1) > 10 and _tied_windows(z2) > 0
  labels = jnp.array([0, 1, 2, 0])
  ours = _cnn_derivatives(lambda p, z: model.apply({"params": p}, z),
                          params, x, labels)
  paper = _cnn_derivatives(
      lambda p, z: _reference_cnn(p, z, act, _one_hot_pool), params, x,
      labels)
  for name, a, b in zip(("logits", "input gradient", "parameter gradient",
                         "second order"), ours, paper):
    chex.assert_trees_all_close(a, b, rtol=2e-5, atol=1e-6,
                                custom_message=name)
  assert float(jnp.abs(ours[1]).sum()) > 0


def test_mnist_cnn_pools_the_output_of_other_activations(tiny):
  # SiLU decreases below -1.28: pooling its input would be another network.
  _, _, _, params, _ = tiny["tiny_cnn"]
  # Pre-activations spread over (-5, 2): many windows below -1.28.
  params = {**params, **{
      layer: {"kernel": 10 * params[layer]["kernel"],
              "bias": jnp.full_like(params[layer]["bias"], -1.5)}
      for layer in ("conv1", "conv2")}}
  x = jnp.asarray(np.random.default_rng(4).uniform(size=(2, 12, 12, 1)),
                  jnp.float32)
  with mock.patch.dict(models.ACTIVATIONS, {"silu": jax.nn.silu}):
    model = models.get_model("tiny_cnn", num_classes=3, activation="silu")
    # A new function per trace: jit's cache would not see the patches.
    apply = lambda: jax.jit(lambda p, z: model.apply({"params": p}, z))(
        params, x)
    pool_after = jax.jit(_reference_cnn, static_argnums=(2, 3))(
        params, x, jax.nn.silu, models.max_pool_2x2)
    np.testing.assert_allclose(apply(), pool_after, rtol=1e-5, atol=1e-5)
    with mock.patch.object(models, "POOL_COMMUTING_ACTIVATIONS",
                           frozenset({"silu"})):
      wrong = apply()
  # 100 times the tolerance above.
  assert not np.allclose(wrong, pool_after, rtol=1e-3, atol=1e-3)

"""Flax Linen models of the RAR paper and the one factory that names them.

The library's core modules take a model only as `apply_fn(params, x) -> logits`;
`make_apply_fns` builds that function (and its smooth surrogate, used by the
attribution attack) from a model name:

  init_fn, apply_fn, surrogate_apply_fn = make_apply_fns(
      "mnist_cnn", num_classes=10)
  params = init_fn(jax.random.key(0), jnp.zeros([1, 28, 28, 1]))
  logits = apply_fn(params, images)            # ReLU network, [N, 10]
  smooth = surrogate_apply_fn(params, images)  # same params, softplus network

Model names (`get_model`, `make_apply_fns`):

| name | class, size | paper input |
|---|---|---|
| `mnist_cnn` | `MnistCNN`, 3,274,634 params | [N,28,28,1] in [0,1] |
| `small_cnn` | `MnistCNN` 3x3x16, 3x3x32, FC 128 | any [N,H,W,C] |
| `tiny_cnn` | `MnistCNN` 3x3x2, 3x3x4, FC 8 (tests) | any [N,H,W,C] |
| `resnet_gtsrb` | `ResNet`, 2 units per stage | [N,32,32,3] in [0,255] |
| `resnet_flower` | `ResNet`, 1 unit per stage | [N,128,128,3] in [0,255] |
| `tiny_resnet` | `ResNet` 2-4-8 channels, 1 unit (tests) | any [N,H,W,C] |

Activations (default first, then the attack's surrogate): CNNs relu /
softplus; ResNets leaky_relu / leaky_softplus.

The convolutions go through `conv_general_dilated`: lax's convolution with a
custom VJP whose gradients are canonical NHWC/HWIO convolutions, which
XLA:CPU keeps on its fast paths inside compiled loops (PGD, the attacks,
chunked IG); `fast_conv_grad=False` gives lax's own rule (forward-mode AD).

References:
  Chen, Wu, Rastogi, Liang, Jha, "Robust Attribution Regularization",
  NeurIPS 2019 (spec Sec. 5); Madry et al., "Towards Deep Learning Models
  Resistant to Adversarial Attacks", ICLR 2018 (MNIST CNN, CIFAR ResNet).
"""

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rar_jax import vma

Array = jax.Array

# Slope of the ResNet's leaky ReLU and its surrogate (code: `_relu(x, 0.1)`).
LEAKINESS = 0.1


def leaky_relu(x: Array) -> Array:
  """Leaky ReLU with slope 0.1; the gradient at 0 is 1, as in the paper's code.

  Args:
    x: any shape.

  Returns:
    `where(x < 0, 0.1 x, x)`, same shape as `x`.

  References:
    Maas, Hannun, Ng, "Rectifier Nonlinearities Improve Neural Network
    Acoustic Models", ICML 2013 workshop; RAR spec Sec. 5.2 (`_relu(x, 0.1)`
    of the GTSRB/Flower code).

  Example:
    >>> import jax.numpy as jnp
    >>> leaky_relu(jnp.array([-1.0, 0.0, 2.0]))
    Array([-0.1,  0. ,  2. ], dtype=float32)
  """
  return jnp.where(x < 0, LEAKINESS * x, x)


@jax.custom_jvp
def softplus(x: Array) -> Array:
  """`log(1 + exp(x))` (`jax.nn.softplus`), with the derivative `sigmoid(x)`.

  The same values as `jax.nn.softplus`. Its derivative is stated as
  `sigmoid(x)` (one `lax.logistic`, whose own derivative reuses its value),
  where `jax.nn.softplus` differentiates `logaddexp(x, 0)` through two
  exponentials and a log-sum. The attribution attack differentiates the
  surrogate network twice; a shortened attack ran in 0.88x the time with
  this rule (BUILD.md, Performance). Tested equal to `jax.nn.softplus` to
  the third derivative.

  Args:
    x: any shape.

  Returns:
    Same shape as `x`.

  References:
    Dugas et al., "Incorporating Second-Order Functional Knowledge for Better
    Option Pricing", NeurIPS 2000 (softplus); RAR spec Sec. 4.2 (the
    attack's smooth surrogate).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> jnp.round(softplus(jnp.array([-20.0, 0.0, 20.0])), 3)
    Array([ 0.   ,  0.693, 20.   ], dtype=float32)
    >>> float(jax.grad(softplus)(0.0))
    0.5
  """
  return jax.nn.softplus(x)


@softplus.defjvp
def _softplus_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  # softplus itself (not jax.nn.softplus), so that differentiating the
  # primal output again also takes this rule.
  return softplus(x), jax.nn.sigmoid(x) * t


def leaky_softplus(x: Array) -> Array:
  """Smooth surrogate of `leaky_relu`: `0.1 x + 0.9 softplus(x)`.

  Args:
    x: any shape.

  Returns:
    Same shape as `x`.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (the
    smooth network of its attribution attack; spec Sec. 4.2).

  Example:
    >>> import jax.numpy as jnp
    >>> jnp.round(leaky_softplus(jnp.array([-20.0, 0.0, 20.0])), 3)
    Array([-2.   ,  0.624, 20.   ], dtype=float32)
  """
  return LEAKINESS * x + (1.0 - LEAKINESS) * softplus(x)


# The one place where activation names resolve.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "softplus": softplus,
    "leaky_relu": leaky_relu,
    "leaky_softplus": leaky_softplus,
}

# Activations that commute with a 2x2 max-pool, derivatives included: each
# never decreases (so act(max(z)) = max(act(z))) and has a zero derivative
# wherever it is flat (relu), so that the first-maximum gradient of either
# order is the same (in exact arithmetic; float32: see `MnistCNN`).
# `MnistCNN` pools such an activation's input, not its output. Another
# activation is pooled after it is applied (`jax.nn.hard_tanh`, for one,
# never decreases, but its derivative is 1 at 1, where it turns flat).
POOL_COMMUTING_ACTIVATIONS = frozenset(
    {"relu", "softplus", "leaky_relu", "leaky_softplus"})

# Activation -> the smooth activation the attribution attack differentiates.
SURROGATES: dict[str, str] = {
    "relu": "softplus",
    "softplus": "softplus",
    "leaky_relu": "leaky_softplus",
    "leaky_softplus": "leaky_softplus",
}


def get_activation(name: str) -> Callable[[Array], Array]:
  """Returns the activation function called `name`.

  Args:
    name: a key of `ACTIVATIONS`.

  Returns:
    An elementwise function, array -> array of the same shape.

  Raises:
    ValueError: `name` is not one of `ACTIVATIONS`.

  References:
    RAR spec Sec. 5 (relu for the CNNs, leaky_relu for the ResNets) and
    Sec. 4.2 (their smooth surrogates in the attribution attack).

  Example:
    >>> import jax.numpy as jnp
    >>> get_activation("relu")(jnp.array([-1.0, 1.0]))
    Array([0., 1.], dtype=float32)
  """
  if name not in ACTIVATIONS:
    raise ValueError(
        f"Unknown activation {name!r}; accepted: {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def _pool_windows(x: Array, fill: float) -> Array:
  """[N, H, W, C] -> [N, ceil(H/2), 2, ceil(W/2), 2, C] (a reshape, no copy).

  An odd edge gets a padded row/column of `fill`.
  """
  n, h, w, c = x.shape
  if h % 2 or w % 2:
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)),
                constant_values=fill)
  return x.reshape(n, (h + 1) // 2, 2, (w + 1) // 2, 2, c)


@jax.custom_jvp
def max_pool_2x2(x: Array) -> Array:
  """2x2 max-pool, stride 2, SAME padding (TF `tf.nn.max_pool` semantics).

  Like `lax.reduce_window` (and TF), the input gradient goes to the first
  maximum of each window (row-major), and the pool is twice differentiable;
  a plain reshape + max would split the gradient among tied maxima, and ties
  are common on MNIST (saturated pixels). Tested equal to `nn.max_pool`,
  values and gradients. A custom JVP states that derivative directly (the
  tangent of the first maximum; its transpose puts the cotangent there), so
  forward and reverse mode, and second derivatives, are exact and cheap:
  XLA:CPU runs `reduce_window`'s select-and-scatter gradient slowly,
  especially inside loops.

  Args:
    x: [N, H, W, C].

  Returns:
    [N, ceil(H/2), ceil(W/2), C].

  References:
    Madry et al. 2018, MNIST challenge `model.py` (`tf.nn.max_pool`); RAR
    spec Sec. 5.1.

  Example:
    >>> import jax.numpy as jnp
    >>> max_pool_2x2(jnp.arange(9.0).reshape(1, 3, 3, 1))[..., 0]
    Array([[[4., 5.],
            [7., 8.]]], dtype=float32)
  """
  # SAME padding: an odd edge gets a padded row/column that never wins.
  return jnp.max(_pool_windows(x, -jnp.inf), axis=(2, 4))


@max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  windows = _pool_windows(x, -jnp.inf)
  # Itself, not jnp.max: differentiated again (second derivatives), this
  # rule must apply again; jnp.max's own rule splits ties.
  y = max_pool_2x2(x)
  # Row-major position 0..3 of each element in its window; the first maximum
  # is the lowest position holding the window's maximum.
  position = (2 * jnp.arange(2, dtype=jnp.int32)[:, None, None]
              + jnp.arange(2, dtype=jnp.int32)[None, None, :])
  position = position.reshape(1, 1, 2, 1, 2, 1)
  first = jnp.min(jnp.where(windows == y[:, :, None, :, None, :], position, 4),
                  axis=(2, 4), keepdims=True)
  tangent = jnp.sum(jnp.where(position == first, _pool_windows(t, 0.0), 0.0),
                    axis=(2, 4))
  return y, tangent


_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def _same_layout(lhs_shape, rhs_shape, dimension_numbers) -> bool:
  if len(lhs_shape) != 4 or len(rhs_shape) != 4:
    return False
  try:
    return (jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape,
                                           dimension_numbers)
            == jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape,
                                              _NHWC_HWIO))
  except (TypeError, ValueError):
    return False


def _stride1_pads(lhs, rhs, window_strides, padding, lhs_dilation,
                  rhs_dilation, dimension_numbers, feature_group_count,
                  batch_group_count, preferred_element_type):
  """Explicit pads of a conv the fast gradient covers, else None."""
  if (tuple(window_strides) != (1, 1)
      or any(d not in (None, (1, 1), [1, 1])
             for d in (lhs_dilation, rhs_dilation))
      or feature_group_count != 1 or batch_group_count != 1
      or preferred_element_type is not None
      or not _same_layout(lhs.shape, rhs.shape, dimension_numbers)):
    return None
  window = tuple(rhs.shape[:2])
  if isinstance(padding, str):
    pads = jax.lax.padtype_to_pads(lhs.shape[1:3], window, (1, 1), padding)
  else:
    pads = padding
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if len(pads) != 2 or any(not (0 <= lo < k and 0 <= hi < k)
                           for (lo, hi), k in zip(pads, window)):
    return None
  return pads


def _plain_conv(x, k, pads, precision):
  return jax.lax.conv_general_dilated(
      x, k, (1, 1), pads, dimension_numbers=_NHWC_HWIO, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fast_conv(x, k, pads, precision):
  return _plain_conv(x, k, pads, precision)


def _fast_conv_fwd(x, k, pads, precision):
  # `_fast_conv` again, not `_plain_conv`: under a second differentiation
  # (the training objectives' double back-propagation) this rule is traced by
  # the outer derivative, which must see the custom rule too, not lax's.
  return _fast_conv(x, k, pads, precision), (x, k)


def _fast_conv_bwd(pads, precision, residuals, g):
  x, k = residuals
  # d/dx of a stride-1 conv is the conv of g with the kernel flipped in
  # space and with in/out swapped, padded by (k-1-lo, k-1-hi). Building
  # that kernel explicitly in HWIO (rather than JAX's rule: a reverse and a
  # kernel spec with I and O swapped) keeps the layout XLA:CPU's fast
  # (YNNPACK) convolution accepts also inside while loops, where XLA leaves
  # the swapped spec to its slower generic convolution. Same numbers.
  k_t = jnp.swapaxes(jnp.flip(k, (0, 1)), 2, 3)
  t_pads = tuple((kd - 1 - lo, kd - 1 - hi)
                 for (lo, hi), kd in zip(pads, k.shape[:2]))
  if input_grad_is_matmul(k.shape[2], k.shape[3]):  # E.g. a first layer.
    dx = _conv_few_outputs(g, k_t, t_pads, precision)
  else:
    dx = _fast_conv(g, k_t, t_pads, precision)
  # d/dk[a, b, i, o] = sum_{n, h, w} x_pad[n, h + a, w + b, i] g[n, h, w, o]:
  # again a canonical stride-1 NHWC/HWIO conv, of x with channels and batch
  # swapped ([I, H, W, N]) by g as a kernel ([Ho, Wo, N, O]). JAX's rule
  # (batch as the contracted feature, an f01b/i01o layout) runs ~35x slower
  # in XLA:CPU loop bodies.
  dk = _fast_conv(jnp.transpose(x, (3, 1, 2, 0)),
                  jnp.transpose(g, (1, 2, 0, 3)), pads, precision)
  return dx, jnp.transpose(dk, (1, 2, 0, 3))


_fast_conv.defvjp(_fast_conv_fwd, _fast_conv_bwd)

# `_conv_few_outputs` replaces a convolution (an input gradient) with at
# most FEW_CHANNELS output channels and at least MIN_CONTRACTED_CHANNELS
# input channels. Narrower convolutions are cheap either way, and compile
# faster as convolutions: the IG-NORM loss gradient of `tiny_cnn` (2 and 4
# channels) traced and compiled in 1.5 + 3.1 s with convolutions against
# 2.1 + 3.9 s with the matmul form (`tiny_resnet`: 2.5 + 7.2 against
# 2.9 + 8.8 s).
FEW_CHANNELS = 3
MIN_CONTRACTED_CHANNELS = 8


def input_grad_is_matmul(in_channels: int, out_channels: int) -> bool:
  """Whether `conv_general_dilated`'s input gradient is a matmul and sums.

  The input gradient of a stride-1 conv from `in_channels` to
  `out_channels` is itself a conv from `out_channels` to `in_channels`;
  `_conv_few_outputs` computes it when it has at most `FEW_CHANNELS`
  outputs from at least `MIN_CONTRACTED_CHANNELS` channels.

  Args:
    in_channels: the forward conv's input channels.
    out_channels: its output channels.

  Returns:
    True where the input gradient takes the matmul form.

  References:
    `BUILD.md`, "Performance", item 6.

  Example:
    >>> input_grad_is_matmul(1, 32), input_grad_is_matmul(2, 4)
    (True, False)
  """
  return (in_channels <= FEW_CHANNELS
          and out_channels >= MIN_CONTRACTED_CHANNELS)


def _conv_few_outputs(x, k, pads, precision):
  """A stride-1 NHWC/HWIO conv with few output channels: a matmul, then sums.

  The input gradient of an image's first layer (1 or 3 channels) is a conv
  with that few outputs, which XLA:CPU's Eigen and YNNPACK convolutions run
  at a few GFLOP/s. With `q[n, h, w, a, b, o] = sum_c x[n, h, w, c]
  k[a, b, c, o]` (one matmul over the channels), the conv is
  `out[n, h, w, o] = sum_{a, b} q_pad[n, h + a, w + b, a, b, o]`, `q_pad`
  being `q` zero-padded by `pads` in space (padding commutes with the
  per-pixel matmul). Same numbers up to float rounding; its derivatives are
  those of a matmul, a pad and slices. On the 2-core CPU of `BUILD.md`, in a
  `fori_loop`, for the MNIST CNN's conv1 input gradient (60 x 28 x 28 x 32
  -> 1 channel, 5x5) 8.0 ms against 17.1 ms for lax's convolution; 3x3, 16
  -> 3 channels at 32x32: 7.0 against 15.1 ms; at 8 output channels the
  convolution is faster (20.5 against 26.0 ms).
  """
  kh, kw, c, o = k.shape
  q = jnp.dot(x, jnp.transpose(k, (2, 0, 1, 3)).reshape(c, kh * kw * o),
              precision=precision)
  q = jnp.pad(q.reshape(x.shape[:3] + (kh * kw, o)),
              ((0, 0), pads[0], pads[1], (0, 0), (0, 0)))
  h = x.shape[1] + pads[0][0] + pads[0][1] - kh + 1
  w = x.shape[2] + pads[1][0] + pads[1][1] - kw + 1
  return sum(q[:, a:a + h, b:b + w, a * kw + b]
             for a in range(kh) for b in range(kw))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with gradients that stay fast in loops.

  The same convolution; for a stride-1, undilated, ungrouped 2-D NHWC/HWIO
  convolution (the CNNs' convs) the gradients are computed by a
  `jax.custom_vjp` that writes both of them as canonical NHWC/HWIO
  convolutions (the input gradient with the flipped, in/out-swapped kernel
  built explicitly; the kernel gradient as a conv of the batch-transposed
  input by the output gradient). XLA:CPU runs canonical convolutions on its
  fast paths at top level and in loops alike; JAX's own rules give kernel
  layouts that XLA:CPU only canonicalises outside loops, so inside
  `lax.fori_loop`/`lax.scan`/`while` bodies (PGD, the attacks, chunked IG)
  they fall to a generic loop-nest convolution: IG on the MNIST CNN ran
  2.2x slower and the kernel gradient ~35x slower (`BUILD.md`,
  "Performance"). An input gradient with at most `FEW_CHANNELS` channels
  from at least `MIN_CONTRACTED_CHANNELS` channels (an image's first layer)
  is a matmul followed by shifted sums instead, which XLA:CPU ran ~2x
  faster than a convolution in the MNIST CNN's programs
  (`_conv_few_outputs`).
  Every other configuration goes to `lax.conv_general_dilated` unchanged.

  Reverse mode works to any order (the rule is itself differentiable and
  uses this function again); forward mode (`jax.jvp`, `jax.jacfwd`) does not
  go through a `custom_vjp`: build the model with `fast_conv_grad=False` for
  that.

  Args:
    lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
    dimension_numbers, feature_group_count, batch_group_count, precision,
    preferred_element_type: as `jax.lax.conv_general_dilated` (the signature
      `nn.Conv(conv_general_dilated=...)` calls).

  Returns:
    The convolution, exactly as `jax.lax.conv_general_dilated`.

  References:
    Dumoulin, Visin, "A guide to convolution arithmetic for deep learning",
    2016 (the transposed convolution); XLA:CPU YNNPACK fusions.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> k = jnp.ones((3, 3, 1, 2))
    >>> args = (x, k, (1, 1), "SAME")
    >>> dn = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> bool(jnp.all(conv_general_dilated(*args, **dn)
    ...              == jax.lax.conv_general_dilated(*args, **dn)))
    True
    >>> g = jax.grad(lambda x: jnp.sum(conv_general_dilated(
    ...     x, k, (1, 1), "SAME", **dn) ** 2))(x)
    >>> g_ref = jax.grad(lambda x: jnp.sum(jax.lax.conv_general_dilated(
    ...     x, k, (1, 1), "SAME", **dn) ** 2))(x)
    >>> bool(jnp.allclose(g, g_ref))
    True
  """
  pads = _stride1_pads(lhs, rhs, window_strides, padding, lhs_dilation,
                       rhs_dilation, dimension_numbers, feature_group_count,
                       batch_group_count, preferred_element_type)
  if pads is None or jnp.result_type(lhs) != jnp.result_type(rhs):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  # Under `jax.shard_map` a replicated kernel meets a per-device input; the
  # custom rule must return a per-device kernel gradient, so the kernel is
  # cast to varying first (JAX sums the gradient over devices, as for lax's).
  lhs, rhs = vma.varying_like(lhs, rhs), vma.varying_like(rhs, lhs)
  return _fast_conv(lhs, rhs, pads, precision)


class MnistCNN(nn.Module):
  """Madry's MNIST CNN (also the paper's Fashion-MNIST model), parameterised.

  conv k x k x c1 SAME + bias -> act -> maxpool 2x2/2 -> conv k x k x c2 ->
  act -> maxpool -> flatten -> FC `dense_features` -> act -> FC `num_classes`
  (computed with the pool before the activation; below).

  An activation of `POOL_COMMUTING_ACTIVATIONS` (all of `ACTIVATIONS`) is
  applied after the pool: `act(max_pool(z))` is `max_pool(act(z))`, on a
  quarter of the elements. With relu the two do the same float32 operations
  on the values and route every gradient alike (relu(z) ties exactly where
  z ties, or where its gradient is 0); XLA may still order a sum
  differently (~1e-7). The other three agree in exact arithmetic; in
  float32, `0.1 x` and softplus round some distinct z to one value
  (softplus is not even monotone in its last bit), and there the gradient
  goes to the window's largest z rather than to the first maximum of
  `act(z)`. The top-k attack, which differentiates the softplus surrogate
  twice, took 0.8x the time this way; the other programs measured gained
  no more than the noise (BUILD.md, Performance, item 9).

  Initialisation as in the paper's code: weights `tf.truncated_normal(stddev=
  0.1)`, i.e. a N(0, 0.1^2) truncated at +-2 std (0.2), whose actual standard
  deviation is 0.1 * 0.8796 = 0.088 (`jax.nn.initializers.truncated_normal(
  0.1)` has the same meaning: `stddev` is that of the untruncated normal);
  biases constant 0.1.

  Attributes:
    num_classes: number of logits.
    conv_features: channels of the conv layers (each followed by a pool).
    kernel_size: spatial size of the square conv kernels.
    dense_features: width of the hidden FC layer.
    activation: a name in `ACTIVATIONS`; the paper uses "relu" and its
      attribution attack "softplus". Parameters do not depend on it.
    fast_conv_grad: convolve with `conv_general_dilated` (same values and
      derivatives, faster in loops on CPU, reverse mode only); False uses
      `lax.conv_general_dilated` (needed for `jax.jvp` through the model).

  References:
    Madry et al. 2018, MNIST challenge `model.py`; RAR spec Sec. 5.1.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = MnistCNN(conv_features=(2, 4), kernel_size=3, dense_features=8)
    >>> x = jnp.zeros((2, 28, 28, 1))
    >>> variables = jax.jit(model.init)(jax.random.key(0), x)
    >>> jax.jit(model.apply)(variables, x).shape
    (2, 10)
  """
  num_classes: int = 10
  conv_features: Sequence[int] = (32, 64)
  kernel_size: int = 5
  dense_features: int = 1024
  activation: str = "relu"
  fast_conv_grad: bool = True

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """Applies the network.

    Args:
      inputs: [N, H, W, C] (paper: [N, 28, 28, 1] in [0, 1]).

    Returns:
      logits: [N, num_classes].
    """
    act = get_activation(self.activation)
    kernel_init = jax.nn.initializers.truncated_normal(0.1)
    bias_init = jax.nn.initializers.constant(0.1)
    x = inputs
    for i, features in enumerate(self.conv_features):
      x = nn.Conv(features, (self.kernel_size, self.kernel_size),
                  padding="SAME", kernel_init=kernel_init,
                  bias_init=bias_init, name=f"conv{i + 1}",
                  conv_general_dilated=_conv_fn(self.fast_conv_grad))(x)
      if self.activation in POOL_COMMUTING_ACTIVATIONS:
        x = act(max_pool_2x2(x))
      else:
        x = max_pool_2x2(act(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.dense_features, kernel_init=kernel_init,
                 bias_init=bias_init, name="fc1")(x)
    x = act(x)
    return nn.Dense(self.num_classes, kernel_init=kernel_init,
                    bias_init=bias_init, name="fc2")(x)


def per_image_standardization(x: Array) -> Array:
  """`tf.image.per_image_standardization`: `(x - mean) / max(std, 1/sqrt(n))`.

  mean and std are over each image's H*W*C = n values. `max(std, 1/sqrt(n))`
  is computed as `sqrt(max(var, 1/n))`: the same value, but with a zero (not
  NaN) gradient for uniform images, whose `sqrt(var)` has an infinite
  derivative.

  Args:
    x: [N, H, W, C].

  Returns:
    [N, H, W, C], float.

  References:
    TensorFlow, `tf.image.per_image_standardization`; RAR spec Sec. 5.2-5.3
    (the first op of the GTSRB/Flower ResNet).

  Example:
    >>> import jax.numpy as jnp
    >>> per_image_standardization(jnp.array([[[[0.0], [2.0]]]]))[..., 0]
    Array([[[-1.,  1.]]], dtype=float32)
  """
  num_values = x.shape[1] * x.shape[2] * x.shape[3]
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=(1, 2, 3), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(jnp.maximum(var, 1.0 / num_values))


class ResidualUnit(nn.Module):
  """Pre-activation residual unit without batch-norm (Madry's CIFAR ResNet).

  `act -> conv3x3(stride) -> act -> conv3x3`, plus the shortcut. With
  `activate_before_residual` the activation is applied before the split, so
  the shortcut carries the activated input. When the shape changes the
  shortcut is avg-pooled (kernel = stride, VALID) and zero-padded by
  (out - in)/2 channels on each side.

  Attributes:
    features: output channels.
    stride: stride of the first conv (and of the shortcut pooling).
    activate_before_residual: see above (first unit of the first stage).
    activation: a name in `ACTIVATIONS`.
    fast_conv_grad: as `MnistCNN.fast_conv_grad`.

  References:
    He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV
    2016; Madry et al. 2018, CIFAR10 challenge `model.py` (`_residual`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> unit = ResidualUnit(features=4, stride=2)
    >>> x = jnp.ones((1, 8, 8, 2))
    >>> variables = jax.jit(unit.init)(jax.random.key(0), x)
    >>> jax.jit(unit.apply)(variables, x).shape
    (1, 4, 4, 4)
  """
  features: int
  stride: int = 1
  activate_before_residual: bool = False
  activation: str = "leaky_relu"
  fast_conv_grad: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies the unit.

    Args:
      x: [N, H, W, C_in].

    Returns:
      [N, ceil(H/stride), ceil(W/stride), features].
    """
    act = get_activation(self.activation)
    in_features = x.shape[-1]
    if (self.features - in_features) % 2:
      raise ValueError(
          f"ResidualUnit pads the shortcut by (out - in)/2 channels per side, "
          f"so out - in must be even; got in={in_features}, "
          f"out={self.features}.")
    if self.activate_before_residual:
      x = act(x)
      shortcut = x
    else:
      shortcut = x
      x = act(x)
    x = _conv3x3(self.features, self.stride, "conv1", self.fast_conv_grad)(x)
    x = act(x)
    x = _conv3x3(self.features, 1, "conv2", self.fast_conv_grad)(x)
    if self.stride > 1:
      shortcut = nn.avg_pool(shortcut, (self.stride, self.stride),
                             strides=(self.stride, self.stride),
                             padding="VALID")
    if self.features != in_features:
      pad = (self.features - in_features) // 2
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (pad, pad)))
    return x + shortcut


def _conv_fn(fast: bool):
  return conv_general_dilated if fast else None  # None: lax's own.


def _conv3x3(features: int, stride: int, name: str,
             fast_conv_grad: bool) -> nn.Conv:
  # TF code: random_normal(stddev=sqrt(2 / (3*3*out))), untruncated; flax
  # kernels are [3, 3, in, out], so fan_out = 9 * out; "normal" is the
  # untruncated normal in jax.nn.initializers.variance_scaling.
  return nn.Conv(
      features, (3, 3), strides=(stride, stride), padding="SAME",
      use_bias=False, name=name,
      conv_general_dilated=_conv_fn(fast_conv_grad),
      kernel_init=jax.nn.initializers.variance_scaling(
          2.0, "fan_out", "normal"))


class ResNet(nn.Module):
  """The paper's GTSRB / Flower ResNet: Madry's CIFAR ResNet without BN.

  per-image standardisation -> conv 3x3 x stem (no bias) -> stages of
  `ResidualUnit`s -> act -> global average pool -> FC (bias).

  Per-image standardisation inside the model makes it invariant to input
  scale (`f(c x) = f(x)`, c > 0), so zero-baseline IG is proportional to
  gradient x input (spec Sec. 6.4, 8.12).

  Attributes:
    num_classes: number of logits (GTSRB 43, Flower 17).
    num_units_per_stage: residual units per stage (GTSRB 2, Flower 1).
    stem_features: channels of the stem conv.
    stage_features: output channels of each stage.
    stage_strides: stride of the first unit of each stage.
    activation: a name in `ACTIVATIONS`; the paper uses "leaky_relu" and its
      attribution attack "leaky_softplus". Parameters do not depend on it.
    fast_conv_grad: as `MnistCNN.fast_conv_grad` (stride-1 convs only).

  References:
    Madry et al. 2018, CIFAR10 challenge `model.py`; RAR spec Sec. 5.2-5.3.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = ResNet(num_classes=3, num_units_per_stage=1, stem_features=2,
    ...                stage_features=(2, 4, 8))
    >>> x = jnp.ones((1, 16, 16, 3))
    >>> logits, variables = jax.eval_shape(              # shapes only
    ...     model.init_with_output, jax.random.key(0), x)
    >>> logits.shape, variables["params"]["logit"]["kernel"].shape
    ((1, 3), (8, 3))
  """
  num_classes: int = 43
  num_units_per_stage: int = 2
  stem_features: int = 16
  stage_features: Sequence[int] = (16, 32, 64)
  stage_strides: Sequence[int] = (1, 2, 2)
  activation: str = "leaky_relu"
  fast_conv_grad: bool = True

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """Applies the network.

    Args:
      inputs: [N, H, W, C] (paper: pixels in [0, 255]; any scale works).

    Returns:
      logits: [N, num_classes].
    """
    if len(self.stage_features) != len(self.stage_strides):
      raise ValueError(
          f"stage_features {tuple(self.stage_features)} and stage_strides "
          f"{tuple(self.stage_strides)} must have the same length.")
    act = get_activation(self.activation)
    x = per_image_standardization(inputs)
    x = _conv3x3(self.stem_features, 1, "init_conv", self.fast_conv_grad)(x)
    for stage, (features, stride) in enumerate(
        zip(self.stage_features, self.stage_strides, strict=True)):
      for unit in range(self.num_units_per_stage):
        x = ResidualUnit(
            features, stride=stride if unit == 0 else 1,
            activate_before_residual=(stage == 0 and unit == 0),
            activation=self.activation,
            fast_conv_grad=self.fast_conv_grad,
            name=f"unit_{stage + 1}_{unit}")(x)
    x = jnp.mean(act(x), axis=(1, 2))
    # TF uniform_unit_scaling_initializer(factor=1.0): U(+-sqrt(3 / fan_in)).
    return nn.Dense(
        self.num_classes, name="logit",
        kernel_init=jax.nn.initializers.variance_scaling(
            1.0, "fan_in", "uniform"),
        bias_init=jax.nn.initializers.zeros)(x)


# The one place where model names resolve: (class, default fields).
_MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "mnist_cnn": (MnistCNN, {}),
    "small_cnn": (MnistCNN, dict(conv_features=(16, 32), kernel_size=3,
                                 dense_features=128)),
    "tiny_cnn": (MnistCNN, dict(conv_features=(2, 4), kernel_size=3,
                                dense_features=8)),
    "resnet_gtsrb": (ResNet, dict(num_units_per_stage=2)),
    "resnet_flower": (ResNet, dict(num_units_per_stage=1)),
    "tiny_resnet": (ResNet, dict(num_units_per_stage=1, stem_features=2,
                                 stage_features=(2, 4, 8))),
}
MODEL_NAMES = tuple(_MODELS)


def get_model(name: str, *, num_classes: int, activation: str | None = None,
              **overrides: Any) -> nn.Module:
  """Builds the Flax module called `name`.

  Args:
    name: one of `MODEL_NAMES` (see the module docstring).
    num_classes: number of logits.
    activation: a name in `ACTIVATIONS`; None takes the model's default
      ("relu" for the CNNs, "leaky_relu" for the ResNets).
    **overrides: other fields of the model class (e.g. `conv_features=(4, 8)`
      or `stage_features=...`), replacing the preset's values.

  Returns:
    An `nn.Module` mapping [N, H, W, C] inputs to [N, num_classes] logits.

  Raises:
    ValueError: unknown model name, activation or override field.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (spec
    Sec. 5: the MNIST CNN and the GTSRB/Flower ResNets).

  Example:
    >>> get_model("small_cnn", num_classes=10).conv_features
    (16, 32)
    >>> get_model("mnist_cnn", num_classes=10, activation="softplus").activation
    'softplus'
  """
  if name not in _MODELS:
    raise ValueError(
        f"Unknown model name {name!r}; accepted: {sorted(_MODELS)}.")
  cls, preset = _MODELS[name]
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(
        f"Unknown override(s) {sorted(unknown)} for model {name!r} "
        f"({cls.__name__}); accepted: "
        f"{sorted(fields - {'num_classes', 'activation'})}.")
  kwargs = {**preset, **overrides, "num_classes": num_classes}
  if activation is not None:
    get_activation(activation)  # Validates the name.
    kwargs["activation"] = activation
  return cls(**kwargs)


def make_apply_fns(
    model_name: str, *, num_classes: int, activation: str | None = None,
    **overrides: Any,
) -> tuple[Callable[[Array, Array], Any], Callable[[Any, Array], Array],
           Callable[[Any, Array], Array]]:
  """Returns `(init_fn, apply_fn, surrogate_apply_fn)` for a named model.

  Args:
    model_name: one of `MODEL_NAMES`.
    num_classes: number of logits.
    activation: activation of `apply_fn` (None: the model's default).
    **overrides: other model fields, as in `get_model`.

  Returns:
    init_fn: `(key, inputs [N, H, W, C]) -> params` (the `"params"`
      collection; conv/FC weights are the leaves named `kernel`).
    apply_fn: `(params, inputs [N, H, W, C]) -> logits [N, num_classes]`.
    surrogate_apply_fn: the same with the activation replaced by its smooth
      surrogate (`SURROGATES`: relu -> softplus, leaky_relu ->
      leaky_softplus), sharing `params`; the attribution attack uses it.

  Raises:
    ValueError: as `get_model`.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (spec
    Sec. 4.2: the attack differentiates the softplus network); Ghorbani,
    Abid, Zou, "Interpretation of Neural Networks is Fragile", AAAI 2019
    (softplus in place of ReLU, whose second derivative is zero).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> init_fn, apply_fn, smooth_fn = make_apply_fns("tiny_cnn",
    ...                                               num_classes=10)
    >>> x = jnp.zeros((2, 28, 28, 1))
    >>> from rar_jax import runtime  # jax.jit(init_fn), compiled faster
    >>> params = runtime.run_once(init_fn, jax.random.key(0), x)
    >>> apply_fn(params, x).shape, smooth_fn(params, x).shape
    ((2, 10), (2, 10))
  """
  model = get_model(model_name, num_classes=num_classes,
                    activation=activation, **overrides)
  surrogate = model.clone(activation=SURROGATES[model.activation])

  def init_fn(key: Array, inputs: Array) -> Any:
    return model.init(key, inputs)["params"]

  def apply_fn(params: Any, inputs: Array) -> Array:
    return model.apply({"params": params}, inputs)

  def surrogate_apply_fn(params: Any, inputs: Array) -> Array:
    return surrogate.apply({"params": params}, inputs)

  return init_fn, apply_fn, surrogate_apply_fn

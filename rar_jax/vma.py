"""Device variance under `jax.shard_map`: which mesh axes a value varies on.

Inside `jax.shard_map` (with its default `check_vma=True`) every value has
a type that records the mesh axes along which it may differ between devices
(its "varying manual axes"). A replicated value that meets a per-device
value is cast to varying by JAX where they meet, and how that cast is
placed matters:

- Differentiating with respect to a replicated value sums its gradient over
  the devices (the transpose of the cast is a `psum`), at every use. The
  train step therefore differentiates with respect to a per-device copy of
  its replicated parameters and sums the gradient once itself.
- A replicated constant cast inside a `lax.scan` body (IG's quadrature nodes
  and weights) becomes a value the backward pass stacks, one per iteration,
  where outside `shard_map` the scan passes the constant through and XLA
  folds it. Cast before the scan, it stays a constant.

Outside `shard_map` (plain `jit`, `pmap`), and inside a `shard_map` with
`check_vma=False` (nothing is tracked there, and a gradient is already
this device's), nothing varies and these helpers return their input
unchanged.

References:
  JAX documentation, "Manual parallelism with shard_map" (`check_vma`,
  `jax.lax.pcast`); Chen et al., "Robust Attribution Regularization",
  NeurIPS 2019 (the training and IG computations this serves).
"""

from typing import Any

import jax


def varying_axes(x: Any) -> frozenset:
  """The `shard_map` mesh axes along which the array `x` varies.

  Args:
    x: an array or tracer.

  Returns:
    A frozenset of axis names; empty outside `shard_map` and for values
    replicated over every axis.

  References:
    JAX documentation, "Manual parallelism with shard_map" (`check_vma`).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    >>> seen = []
    >>> def f(w, x):
    ...   seen.append((varying_axes(w), varying_axes(x)))
    ...   return x * w
    >>> _ = jax.shard_map(f, mesh=mesh, in_specs=(P(), P("batch")),
    ...                   out_specs=P("batch"))(jnp.ones(()), jnp.ones(2))
    >>> seen
    [(frozenset(), frozenset({'batch'}))]
    >>> varying_axes(jnp.ones(2))   # outside shard_map
    frozenset()
  """
  return varying_axes_of_aval(jax.typeof(x))


def varying_axes_of_aval(aval: Any) -> frozenset:
  """`varying_axes` of an abstract value (a jaxpr variable's `aval`).

  Args:
    aval: a `jax.core.ShapedArray` (any object without device variance
      gives the empty set).

  Returns:
    A frozenset of axis names.

  References:
    JAX documentation, "Manual parallelism with shard_map" (`check_vma`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> varying_axes_of_aval(jax.typeof(jnp.ones(3)))
    frozenset()
  """
  mat = getattr(aval, "mat", None)  # jax 0.10: the manual axis type.
  varying = getattr(mat, "varying", None)
  if varying is None:
    varying = getattr(aval, "vma", None)  # Older jax.
  return frozenset(varying or ())


def cast_to_varying(x: Any, axes: Any) -> Any:
  """`x` cast to vary along `axes` (`jax.lax.pcast`); `x` if `axes` is empty.

  Args:
    x: an array inside `shard_map` (anything, when `axes` is empty).
    axes: mesh axis names along which `x` does not vary yet.

  Returns:
    `x`, typed as varying along `axes` (the same values).

  References:
    JAX documentation, `jax.lax.pcast`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    >>> f = lambda w: cast_to_varying(w, {"batch"})
    >>> jax.shard_map(f, mesh=mesh, in_specs=P(), out_specs=P("batch"))(
    ...     jnp.arange(2.0))
    Array([0., 1.], dtype=float32)
  """
  return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def varying_like(tree: Any, like: Any) -> Any:
  """Every leaf of `tree` cast to vary along the axes that `like` varies on.

  The leaves keep their values; a leaf that already varies along an axis is
  not cast again. Outside `shard_map`, `tree` is returned unchanged.

  Args:
    tree: a pytree of arrays (replicated parameters, constants).
    like: an array whose device variance the leaves should have (this
      device's batch).

  Returns:
    The pytree, each leaf varying along `varying_axes(like)` (at least).

  References:
    JAX documentation, "Manual parallelism with shard_map" (`check_vma`,
    `jax.lax.pcast`).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    >>> def summed_grad(w, x):
    ...   loss = lambda w: jnp.sum(x * w)
    ...   g = jax.grad(loss)(varying_like(w, x))   # this device's gradient
    ...   return jax.lax.psum(g, "batch")          # summed once
    >>> jax.shard_map(summed_grad, mesh=mesh, in_specs=(P(), P("batch")),
    ...               out_specs=P())(jnp.ones(()), jnp.arange(3.0))
    Array(3., dtype=float32)

    (On one device as here, or on n; without `varying_like`, `jax.grad`
    would already sum over the devices, and the psum would give n times
    the gradient.)
  """
  axes = varying_axes(like)
  return jax.tree.map(lambda leaf: cast_to_varying(
      leaf, axes - varying_axes(leaf)), tree)

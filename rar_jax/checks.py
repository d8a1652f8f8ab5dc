"""Checks of user-supplied arrays, shared by the public functions.

Each raises a `ValueError` that names the bad value and what is accepted,
before anything is compiled. Values being traced (under `jit`, `vmap`, `grad`)
cannot be inspected and are not checked: the checks guard eager calls from a
notebook or script, and the binaries check their data once when loading it
(`rar_jax.train.check_data`). Inspection runs in NumPy on the host, so it
compiles nothing.

Example:
  >>> import numpy as np
  >>> check_in_box("inputs", np.array([[0.5, 1.5]]), 0.0, 1.0)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: inputs has values in [0.5, 1.5], outside the pixel box [clip_min, clip_max] = [0, 1]; ...
"""

from typing import Optional

import jax
import numpy as np


def is_concrete_number(v) -> bool:
  """True for a Python or NumPy number (not a bool, not a traced value).

  References:
    The house rule of rar_jax (BUILD.md, Reliability): bad input gets one
    clear error naming the value, before anything is compiled.

  Example:
    >>> is_concrete_number(0.3), is_concrete_number(True)
    (True, False)
  """
  return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def host_value(x) -> Optional[np.ndarray]:
  """`x` as a NumPy array, or None if `x` is being traced.

  References:
    The house rule of rar_jax (BUILD.md, Reliability): bad input gets one
    clear error naming the value, before anything is compiled.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> host_value(jnp.ones(2))
    array([1., 1.], dtype=float32)
    >>> jax.jit(lambda x: host_value(x) is None)(jnp.ones(2))
    Array(True, dtype=bool)
  """
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
    return None


def check_finite(name: str, x) -> None:
  """Refuses NaN or infinite entries in a concrete array.

  Args:
    name: what `x` is, for the message.
    x: `[N, ...]` (or a scalar); integer arrays pass.

  Raises:
    ValueError: the count of bad values and the first example holding one.

  References:
    The house rule of rar_jax (BUILD.md, Reliability): bad input gets one
    clear error naming the value, before anything is compiled.

  Example:
    >>> import numpy as np
    >>> check_finite("inputs", np.array([[0.0, np.nan]]))
    Traceback (most recent call last):
    ...
    ValueError: inputs has 1 NaN or infinite values in 1 example(s), the first at index 0; accepted: finite values.
  """
  value = host_value(x)
  if value is None or not np.issubdtype(value.dtype, np.inexact):
    return
  finite = np.isfinite(value)
  if not finite.all():
    rows = (np.flatnonzero(~finite.reshape(len(value), -1).all(axis=1))
            if value.ndim else np.array([0]))
    where = (f"in {rows.size} example(s), the first at index {rows[0]}"
             if value.ndim else "")
    raise ValueError(
        f"{name} has {int((~finite).sum())} NaN or infinite values {where}; "
        "accepted: finite values.".replace("  ", " "))


def check_in_box(name: str, x, clip_min, clip_max) -> None:
  """Refuses non-finite values, or values outside `[clip_min, clip_max]`.

  The attacks project onto this box: an input outside it would be moved
  without a word, so it is an error instead. A `None` bound is open.

  Args:
    name: what `x` is, for the message.
    x: `[N, ...]` pixels.
    clip_min: lower end of the box, or None.
    clip_max: upper end of the box, or None.

  Raises:
    ValueError: the range found and the box.

  References:
    The house rule of rar_jax (BUILD.md, Reliability): bad input gets one
    clear error naming the value, before anything is compiled.

  Example:
    >>> import numpy as np
    >>> check_in_box("inputs", np.array([[0.0, 255.0]]), 0.0, 255.0)  # fine
  """
  check_finite(name, x)
  value = host_value(x)
  if value is None or value.size == 0:
    return
  lo = clip_min if is_concrete_number(clip_min) else -np.inf
  hi = clip_max if is_concrete_number(clip_max) else np.inf
  if value.min() < lo or value.max() > hi:
    fmt = lambda v: "None" if v is None else f"{v:g}"
    raise ValueError(
        f"{name} has values in [{value.min():g}, {value.max():g}], outside "
        f"the pixel box [clip_min, clip_max] = [{fmt(clip_min)}, "
        f"{fmt(clip_max)}]; pass the data's range as clip_min/clip_max (e.g. "
        "0 and 255 for raw 8-bit pixels) or rescale the inputs.")


def check_labels(labels, *, num_examples: int,
                 num_classes: Optional[int] = None) -> None:
  """Refuses labels that are not `[N]` integers in `[0, num_classes)`.

  Args:
    labels: `[N]` class indices.
    num_examples: N, the inputs' batch size.
    num_classes: the model's number of classes (None: not checked).

  Raises:
    ValueError: a wrong shape, a non-integer dtype, or labels out of range.

  References:
    The house rule of rar_jax (BUILD.md, Reliability): bad input gets one
    clear error naming the value, before anything is compiled.

  Example:
    >>> import numpy as np
    >>> check_labels(np.array([0, 9]), num_examples=2, num_classes=3)
    Traceback (most recent call last):
    ...
    ValueError: labels in [0, 9] are not accepted: the model has 3 classes; accepted: 0 <= label < 3.
  """
  shape = tuple(np.shape(labels))
  if shape != (num_examples,):
    raise ValueError(
        f"labels of shape {shape} do not match the inputs; accepted: [N] = "
        f"({num_examples},), one integer class per example.")
  value = host_value(labels)
  if value is None:
    return
  if not np.issubdtype(value.dtype, np.integer):
    raise ValueError(f"labels of dtype {value.dtype} are not accepted; "
                     "accepted: integer class indices.")
  if num_classes is not None and value.size and (
      value.min() < 0 or value.max() >= num_classes):
    raise ValueError(
        f"labels in [{value.min()}, {value.max()}] are not accepted: the "
        f"model has {num_classes} classes; accepted: 0 <= label < "
        f"{num_classes}.")


__all__ = ["is_concrete_number", "host_value", "check_finite", "check_in_box",
           "check_labels"]

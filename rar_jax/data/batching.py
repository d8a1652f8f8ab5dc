"""Deterministic host-side batching and per-device sharding.

The order of examples is a pure function of `(seed, step)`: epoch `e` uses the
permutation `np.random.default_rng([seed, e]).permutation(N)`, so a run
resumed at step `k` (`batches(..., start_step=k)`) sees exactly the batches an
uninterrupted run sees from step `k` on, and every host computes the same
global batch.

  for step, (inputs, labels) in zip(
      range(start, num_steps),
      batches(images, labels, batch_size=50, seed=seed, start_step=start,
              num_devices=jax.local_device_count())):
    state = p_train_step(state, inputs, labels)  # inputs [D, 50 // D, ...]
"""

import itertools
from typing import Any, Iterator

import jax
import numpy as np


def epoch_permutation(num_examples: int, *, seed: int,
                      epoch: int) -> np.ndarray:
  """The order of the examples in one epoch.

  Args:
    num_examples: dataset size N.
    seed: data-order seed.
    epoch: epoch index, >= 0.

  Returns:
    int64 [N], a permutation of `range(N)` that depends only on
    (seed, epoch, N).

  References:
    NumPy, `numpy.random.default_rng` (the generator seeded with the
    sequence `[seed, epoch]`).

  Example:
    >>> epoch_permutation(5, seed=0, epoch=0)
    array([2, 4, 3, 0, 1])
    >>> epoch_permutation(5, seed=0, epoch=1)
    array([1, 4, 3, 0, 2])
  """
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batches(images: np.ndarray, labels: np.ndarray, *, batch_size: int,
            seed: int = 0, start_step: int = 0, num_epochs: int | None = None,
            shuffle: bool = True, drop_remainder: bool = True,
            num_devices: int | None = None,
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields batches in an order that is a pure function of (seed, step).

  Step `s` reads positions `[b*B, (b+1)*B)` of epoch `s // S`'s permutation,
  with `b = s % S` and `S` batches per epoch (`N // B` with
  `drop_remainder`, else `ceil(N / B)`, the last one smaller).

  Args:
    images: [N, ...], any array type that numpy can index.
    labels: [N, ...].
    batch_size: global batch size B (over all devices and hosts).
    seed: data-order seed (ignored when `shuffle` is False).
    start_step: index of the first batch to yield (resume point).
    num_epochs: stop after this many epochs (counted from step 0); None
      yields forever.
    shuffle: permute each epoch; False keeps the stored order.
    drop_remainder: drop each epoch's last partial batch.
    num_devices: if set, each batch goes through `shard_batch` and comes out
      as [num_devices, B / (num_devices * process_count), ...] (this host's
      part only); a partial last batch must divide too (or use `pad_batch`).

  Yields:
    (images [B, ...], labels [B, ...]), or sharded as above.

  Raises:
    ValueError: N and B disagree (empty data, `B > N` with
      `drop_remainder`), bad sizes, or B not divisible by the device count.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (the
    training loop's minibatches, spec Sec. 3.1).

  Example:
    >>> import numpy as np
    >>> x, y = np.arange(10), np.arange(10) % 2
    >>> train = batches(x, y, batch_size=4, seed=0)       # endless, shuffled
    >>> [next(train)[0] for _ in range(3)]                # 2 batches per epoch
    [array([4, 6, 2, 7]), array([3, 5, 9, 0]), array([9, 1, 3, 8])]
    >>> next(batches(x, y, batch_size=4, seed=0, start_step=2))[0]  # resumed
    array([9, 1, 3, 8])
    >>> [b for b, _ in batches(x, y, batch_size=4, shuffle=False,  # evaluation
    ...                        num_epochs=1, drop_remainder=False)]
    [array([0, 1, 2, 3]), array([4, 5, 6, 7]), array([8, 9])]
  """
  num_examples = len(images)
  if len(labels) != num_examples:
    raise ValueError(
        f"images and labels differ in length: {num_examples} vs "
        f"{len(labels)}.")
  if batch_size < 1 or start_step < 0:
    raise ValueError(
        f"Need batch_size >= 1 and start_step >= 0; got batch_size="
        f"{batch_size}, start_step={start_step}.")
  if num_examples == 0 or (drop_remainder and batch_size > num_examples):
    raise ValueError(
        f"batch_size {batch_size} with drop_remainder={drop_remainder} gives "
        f"no batch from {num_examples} examples.")
  if num_devices is not None:
    # Fail before the first batch, naming both numbers.
    _per_device_size(batch_size, num_devices * jax.process_count())
  steps_per_epoch = (num_examples // batch_size if drop_remainder
                     else -(-num_examples // batch_size))
  epoch = start_step // steps_per_epoch
  first = start_step % steps_per_epoch
  epochs = itertools.count(epoch) if num_epochs is None else range(
      epoch, num_epochs)
  for epoch in epochs:
    order = (epoch_permutation(num_examples, seed=seed, epoch=epoch)
             if shuffle else np.arange(num_examples))
    for b in range(first, steps_per_epoch):
      index = order[b * batch_size:(b + 1) * batch_size]
      batch = (images[index], labels[index])
      if num_devices is not None:
        batch = shard_batch(batch, num_devices=num_devices)
      yield batch
    first = 0


def shard_batch(batch: Any, *, num_devices: int | None = None,
                process_index: int | None = None,
                process_count: int | None = None):
  """Takes this host's part of a global batch and splits it over its devices.

  The global batch (identical on every host) is cut into `process_count`
  contiguous parts; host `process_index` keeps its part and reshapes it to
  [num_devices, B / (num_devices * process_count), ...] for `jax.pmap`.

  Args:
    batch: a pytree of arrays [B, ...] (e.g. `(inputs, labels)`).
    num_devices: local devices D (None: `jax.local_device_count()`).
    process_index: this host (None: `jax.process_index()`).
    process_count: number of hosts P (None: `jax.process_count()`).

  Returns:
    The same pytree with leaves [D, B / (D * P), ...].

  Raises:
    ValueError: B is not divisible by D * P (the message names both).

  References:
    JAX documentation, `jax.pmap` (a leading device axis) and
    multi-process environments (`jax.process_index`, `jax.process_count`).

  Example:
    >>> import numpy as np
    >>> shard_batch(np.arange(8), num_devices=2, process_index=1,
    ...             process_count=2)                   # host 1 of 2
    array([[4, 5],
           [6, 7]])
  """
  num_devices = num_devices or jax.local_device_count()
  process_index = (jax.process_index() if process_index is None
                   else process_index)
  process_count = process_count or jax.process_count()

  def shard(x):
    x = np.asarray(x)
    per_device = _per_device_size(len(x), num_devices * process_count)
    per_host = per_device * num_devices
    x = x[process_index * per_host:(process_index + 1) * per_host]
    return x.reshape((num_devices, per_device) + x.shape[1:])

  return jax.tree.map(shard, batch)


def _per_device_size(batch_size: int, num_devices: int) -> int:
  if batch_size % num_devices:
    raise ValueError(
        f"Batch size {batch_size} is not divisible by the number of devices "
        f"{num_devices} (local devices x processes); choose a batch size that "
        f"is a multiple of {num_devices}.")
  return batch_size // num_devices


def pad_batch(images: np.ndarray, labels: np.ndarray, *,
              batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads a final partial batch to `batch_size`, with a mask of real examples.

  For evaluation under `pmap`, which needs equal shapes: metrics are summed
  with `mask` as weights and divided by `mask.sum()` once at the end.

  Args:
    images: [n, ...] with n <= batch_size.
    labels: [n, ...].
    batch_size: padded size B.

  Returns:
    images [B, ...] and labels [B, ...] (padding repeats zeros), and
    mask float32 [B]: 1 for the n real examples, 0 for padding.

  Raises:
    ValueError: n > batch_size.

  References:
    RAR spec Sec. 4.1 (accuracy over every test example, the last partial
    batch included).

  Example:
    >>> import numpy as np
    >>> images, labels, mask = pad_batch(np.ones((3, 2)), np.arange(3),
    ...                                  batch_size=4)
    >>> images.shape, labels, mask
    ((4, 2), array([0, 1, 2, 0]), array([1., 1., 1., 0.], dtype=float32))
  """
  n = len(images)
  if n > batch_size:
    raise ValueError(f"Cannot pad {n} examples to batch_size {batch_size}.")

  def pad(x):
    return np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:],
                                       x.dtype)])

  mask = np.zeros(batch_size, np.float32)
  mask[:n] = 1.0
  return pad(np.asarray(images)), pad(np.asarray(labels)), mask

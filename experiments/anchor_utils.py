"""What the anchor binaries share: timing and the digits they run on.

`captum_anchor.py` and `tf1_anchor.py` run in environments without JAX
(PyTorch or TensorFlow only), so this module needs only NumPy and the
standard library.
"""

import statistics
import time
from typing import Callable, Optional

import numpy as np


def time_runs(fn: Callable[[], object], warmup: int,
              repeats: int) -> dict[str, object]:
  """Runs `fn` `warmup` times untimed, then `repeats` times timed.

  `fn` must block until its work is done (the anchors' frameworks run
  eagerly or through `Session.run`).

  Returns:
    `median_s`, `min_s`, `max_s` and every run's `times_s`.
  """
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return dict(median_s=statistics.median(times), min_s=min(times),
              max_s=max(times), times_s=times)


def load_digits(npz: Optional[str], n: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `n` digits of `npz` (cycled), or random digit-shaped data.

  Args:
    npz: a file with uint8 `images` [N, 28, 28] and `labels` [N]; None
      gives random uint8 pixels and labels (timing only).
    n: examples wanted.

  Returns:
    `(images float32 [n, 28, 28, 1] in [0, 1], labels int64 [n])`.
  """
  if npz is None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
  else:
    with np.load(npz) as data:
      images, labels = data["images"], data["labels"]
  idx = np.arange(n) % len(labels)
  return (images[idx].astype(np.float32)[..., None] / 255.0,
          labels[idx].astype(np.int64))

"""Data for rar_jax: named datasets as arrays, deterministic batches.

  from rar_jax import data
  images, labels = data.load_dataset("embedded_mnist", "train")
  for inputs, targets in data.batches(images, labels, batch_size=50, seed=0):
    ...

`load_dataset` resolves every dataset name (`sources.py`: the shipped MNIST
sample, tensorflow-datasets, `.npz`, IDX and image-folder files) and returns
`(images float32 [N, H, W, C], labels int32 [N])` in the paper's pixel range;
`batches`/`shard_batch` (`batching.py`) give an order that is a pure function
of (seed, step). GTSRB and Flower-17 are prepared once with
`python -m rar_jax.data.prepare` (`prepare.py`; the paper's class-balancing
augmentation is `augment.py`).
"""

from rar_jax.data.batching import batches
from rar_jax.data.batching import epoch_permutation
from rar_jax.data.batching import pad_batch
from rar_jax.data.batching import shard_batch
from rar_jax.data.sources import DATASET_NAMES
from rar_jax.data.sources import ScaledPixels
from rar_jax.data.sources import load_dataset
from rar_jax.data.sources import load_embedded_mnist
from rar_jax.data.sources import load_idx
from rar_jax.data.sources import load_image_folder
from rar_jax.data.sources import load_npz
from rar_jax.data.sources import read_idx
from rar_jax.data.sources import read_image
from rar_jax.data.sources import resize_images
from rar_jax.data.sources import to_float

__all__ = [
    "DATASET_NAMES",
    "ScaledPixels",
    "batches",
    "epoch_permutation",
    "load_dataset",
    "load_embedded_mnist",
    "load_idx",
    "load_image_folder",
    "load_npz",
    "pad_batch",
    "read_idx",
    "read_image",
    "resize_images",
    "shard_batch",
    "to_float",
]

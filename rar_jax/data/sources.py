"""Loads labelled images as `(images float32 [N,H,W,C], labels int32 [N])`.

`load_dataset(name, split)` is the one place where dataset names resolve:

| name | what | pixels |
|---|---|---|
| `embedded_mnist` | 3,000 MNIST digits in the package (2,500/500) | [0, 1] |
| `mnist`, `fashion_mnist` | tensorflow-datasets (`tfds.data_source`) | [0, 1] |
| `oxford_flowers102` | tensorflow-datasets, resized (default 128x128) | [0, 255] |
| `tfds:NAME` | a tfds dataset with `image`, `label` features | [0, 255] |
| `npz:PATH` | a `.npz` file or a folder of `{split}.npz` | [0, 255] |
| `idx:DIR` | MNIST/Fashion-MNIST IDX files (`load_idx`) | [0, 1] |
| `folder:DIR` | one sub-folder of images per class | [0, 255] |

The default ranges are the paper's (MNIST and Fashion-MNIST in [0, 1], GTSRB
and Flower in [0, 255]); `pixel_max` overrides them. Integer pixels are taken
as 0..255 and scaled to [0, pixel_max]; float pixels stored in a `.npz` are
returned unchanged. With `keep_integers=True`, 8-bit images come back as a
`ScaledPixels` that converts them row by row when indexed. Nothing here
downloads: tfds datasets must already be prepared in `data_dir` unless
`download=True`.

References:
  Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (spec Sec.
  3.2 pixel ranges, Sec. 5 data).
"""

import gzip
import os
import pathlib
import re
from typing import Any
import zipfile

import numpy as np

# Pixel range per named source (`pixel_max`): the paper's ranges.
_UNIT, _BYTE = 1.0, 255.0
_EMBEDDED_FILE = pathlib.Path(__file__).resolve().parent / "mnist_sample.npz"
_EMBEDDED_NUM_TRAIN = 2500
_TFDS_DATASETS = {  # name -> (pixel_max, default image_size)
    "mnist": (_UNIT, None),
    "fashion_mnist": (_UNIT, None),
    "oxford_flowers102": (_BYTE, (128, 128)),
}
_PREFIXES = ("tfds:", "npz:", "idx:", "folder:")
DATASET_NAMES = ("embedded_mnist",) + tuple(_TFDS_DATASETS) + tuple(
    p + "..." for p in _PREFIXES)
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".pnm", ".bmp",
                     ".gif", ".tif", ".tiff", ".webp", ".npy")
_IDX_FILES = {  # split -> (images, labels) file stems
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def load_dataset(name: str, split: str, *, data_dir: str | None = None,
                 pixel_max: float | None = None,
                 image_size: tuple[int, int] | None = None,
                 download: bool = False,
                 keep_integers: bool = False
                 ) -> tuple["np.ndarray | ScaledPixels", np.ndarray]:
  """Loads a whole split of a named dataset into host memory.

  Args:
    name: see the module docstring (`DATASET_NAMES`).
    split: "train" or "test" for the embedded, IDX and prepared `.npz`
      sources, optionally with rows, "train[:8000]", "train[8000:]" (a
      `.npz` file with `images`/`labels` is one split whatever the name, so
      rows split it in two); any tfds split string (e.g. "train[5000:]": 55,000 images, as
      many as the paper trains on, though not the same ones) for tfds
      datasets.
    data_dir: tfds data folder (None: tfds' default, `$TFDS_DATA_DIR` or
      `~/tensorflow_datasets`); ignored by the other sources.
    pixel_max: scale integer pixels to [0, pixel_max] (None: the source's
      default in the table above).
    image_size: (height, width) to resize every image to (needs Pillow);
      None keeps the stored size (`oxford_flowers102`: 128x128).
    download: let tfds download and prepare a missing dataset (needs the
      network and TensorFlow); by default a missing dataset is an error.
    keep_integers: return 8-bit images as `ScaledPixels`, which keeps them
      as stored (a quarter of float32's memory: 1.3 GB instead of 5.3 GB for
      the paper's balanced GTSRB) and converts each indexed batch, bit for
      bit as here. Float sources are returned as float32 either way.

  Returns:
    images: float32 [N, H, W, C] (or `ScaledPixels` of that shape).
    labels: int32 [N].

  Raises:
    ValueError: unknown name or split, or malformed data.
    FileNotFoundError: missing files or an unprepared tfds dataset.

  References:
    Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (spec
    Sec. 3.2 pixel ranges, Sec. 5 data); TensorFlow Datasets,
    `tfds.data_source`.

  Example:
    >>> images, labels = load_dataset("embedded_mnist", "test")
    >>> images.shape, images.dtype, labels[:4]
    ((500, 28, 28, 1), dtype('float32'), array([8, 7, 8, 5], dtype=int32))
    >>> import os, tempfile, numpy as np
    >>> folder = tempfile.mkdtemp()                     # like prepare.py's
    >>> np.savez(os.path.join(folder, "test.npz"), labels=np.array([0, 1]),
    ...          images=np.full((2, 4, 4, 3), 255, np.uint8))
    >>> images, labels = load_dataset("npz:" + folder, "test")
    >>> images.shape, float(images.max())              # [0, 255]
    ((2, 4, 4, 3), 255.0)
  """
  rows = slice(None)
  if not (name in _TFDS_DATASETS or name.startswith("tfds:")):
    split, rows = _split_rows(split)   # tfds slices splits itself
  if name == "embedded_mnist":
    images, labels = _embedded_mnist_uint8(split)
    default_max = _UNIT
  elif name in _TFDS_DATASETS or name.startswith("tfds:"):
    tfds_name = name.removeprefix("tfds:")
    default_max, default_size = _TFDS_DATASETS.get(tfds_name, (_BYTE, None))
    images, labels = _load_tfds_uint8(
        tfds_name, split, data_dir=data_dir,
        image_size=image_size or default_size, download=download)
    image_size = None  # Already resized.
  elif name.startswith("npz:"):
    images, labels = load_npz(name.removeprefix("npz:"), split)
    default_max = _BYTE
  elif name.startswith("idx:"):
    images, labels = load_idx(name.removeprefix("idx:"), split)
    default_max = _UNIT
  elif name.startswith("folder:"):
    images, labels = load_image_folder(
        name.removeprefix("folder:"), split=split, image_size=image_size)
    image_size = None
    default_max = _BYTE
  else:
    raise ValueError(
        f"Unknown dataset name {name!r}; accepted: {list(DATASET_NAMES)} "
        "(PATH/DIR/NAME after a prefix).")
  images, labels = images[rows], labels[rows]
  if image_size is not None:
    images = resize_images(images, image_size)
  pixel_max = default_max if pixel_max is None else pixel_max
  if keep_integers and images.dtype == np.uint8:
    return ScaledPixels(images, pixel_max=pixel_max), labels
  return to_float(images, pixel_max=pixel_max), labels


class ScaledPixels:
  """8-bit images kept as stored; indexing returns them as float32.

  `pixels[index]` is `to_float(stored[index], pixel_max=pixel_max)`, the
  same values `load_dataset` returns without `keep_integers`, converted
  only for the rows asked for (a training batch), so a large dataset takes
  a quarter of the memory. `np.asarray(pixels)` converts everything.

  Attributes:
    stored: the uint8 images, [N, H, W, C].
    pixel_max: 255 maps to this (a finite number > 0).
    shape: `stored.shape`.
    dtype: float32, the dtype that indexing returns.

  References:
    The paper's GTSRB code keeps its 8-bit training set and converts each
    batch (RAR spec Sec. 5.2).

  Example:
    >>> import numpy as np
    >>> pixels = ScaledPixels(np.array([[0], [255]], np.uint8), pixel_max=1.0)
    >>> pixels[1:], pixels.value_range(), len(pixels)
    (array([[1.]], dtype=float32), (0.0, 1.0), 2)
  """

  dtype = np.dtype(np.float32)

  def __init__(self, stored: np.ndarray, *, pixel_max: float):
    if stored.dtype != np.uint8:
      raise ValueError(f"ScaledPixels holds uint8 images; got dtype "
                       f"{stored.dtype}.")
    if not (np.isfinite(pixel_max) and pixel_max > 0):
      raise ValueError(f"pixel_max must be a finite number > 0; got "
                       f"{pixel_max}.")
    self.stored = stored
    self.pixel_max = pixel_max
    self.shape = stored.shape
    self.ndim = stored.ndim

  def __len__(self) -> int:
    return len(self.stored)

  def __getitem__(self, index) -> np.ndarray:
    return to_float(np.asarray(self.stored[index]), pixel_max=self.pixel_max)

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    if copy is False:
      raise ValueError("ScaledPixels converts its images: np.asarray needs "
                       "a copy (copy=False is not possible).")
    out = to_float(self.stored, pixel_max=self.pixel_max)
    return out if dtype is None else out.astype(dtype)

  def value_range(self) -> tuple[float, float]:
    """(min, max) of the float32 values, from the stored extremes."""
    if not len(self.stored):
      raise ValueError("value_range of an empty set of images.")
    ends = np.array([self.stored.min(), self.stored.max()])
    lo, hi = to_float(ends, pixel_max=self.pixel_max)
    return float(lo), float(hi)


_ROWS = re.compile(r"^([\w-]+)\[(-?\d*):(-?\d*)\]$")


def _split_rows(split: str) -> tuple[str, slice]:
  """"train[:8000]" -> ("train", slice(None, 8000)); "test" -> all rows."""
  match = _ROWS.match(split)
  if match is None:
    if "[" in split:
      raise ValueError(
          f"split={split!r} is not accepted; accepted: NAME or NAME[START:STOP]"
          " with integer rows (e.g. 'train[:8000]', 'train[8000:]').")
    return split, slice(None)
  base, start, stop = match.groups()
  return base, slice(int(start) if start else None,
                     int(stop) if stop else None)


def to_float(images: np.ndarray, *, pixel_max: float) -> np.ndarray:
  """Converts images to float32; integer pixels 0..255 go to [0, pixel_max].

  Args:
    images: [N, H, W, C]; integer (0..255) or float (returned unchanged).
    pixel_max: upper end of the output range for integer input.

  Returns:
    float32 [N, H, W, C].

  References:
    The TensorFlow 1.x MNIST reader used by the paper's code (`images *
    (1.0 / 255.0)`); RAR spec Sec. 3.2 (pixel ranges).

  Example:
    >>> import numpy as np
    >>> to_float(np.array([0, 255], np.uint8), pixel_max=1.0)
    array([0., 1.], dtype=float32)
    >>> to_float(np.array([0, 255], np.uint8), pixel_max=255.0)
    array([  0., 255.], dtype=float32)
  """
  if not np.issubdtype(images.dtype, np.integer):
    return images.astype(np.float32)
  out = images.astype(np.float32)
  if pixel_max != _BYTE:
    # `x * float32(1/255)`, as TF's MNIST reader does (not `x / 255`).
    out *= np.float32(pixel_max / _BYTE)
  return out


def load_embedded_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Loads the MNIST sample shipped in the package (see `data/README.md`).

  Args:
    split: "train" (the first 2,500 images) or "test" (the last 500).

  Returns:
    images: float32 [N, 28, 28, 1] in [0, 1].
    labels: int32 [N], digits 0..9.

  Raises:
    ValueError: unknown split.

  References:
    LeCun, Bottou, Bengio, Haffner, "Gradient-Based Learning Applied to
    Document Recognition", Proc. IEEE 1998 (MNIST); `rar_jax/data/README.md`
    (the sample's provenance).

  Example:
    >>> images, labels = load_embedded_mnist("train")
    >>> images.shape, float(images.max()), labels[:4]
    ((2500, 28, 28, 1), 1.0, array([3, 8, 1, 0], dtype=int32))
  """
  images, labels = _embedded_mnist_uint8(split)
  return to_float(images, pixel_max=_UNIT), labels


def _embedded_mnist_uint8(split: str) -> tuple[np.ndarray, np.ndarray]:
  if split not in ("train", "test"):
    raise ValueError(
        f"Unknown split {split!r} for embedded_mnist; accepted: "
        "['train', 'test'].")
  with np.load(_EMBEDDED_FILE) as data:
    images, labels = data["images"], data["labels"]
  part = (slice(None, _EMBEDDED_NUM_TRAIN) if split == "train"
          else slice(_EMBEDDED_NUM_TRAIN, None))
  return images[part, :, :, None], labels[part].astype(np.int32)


def load_npz(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Loads images and labels from `.npz` files.

  Accepted layouts, tried in this order:
    * `path` is a folder: reads `path/{split}.npz` (what `rar_jax.data.prepare`
      writes), with keys `images`/`labels`.
    * `path` is a file with keys `x_{split}`/`y_{split}` (e.g. Keras'
      `mnist.npz`: `x_train`, `y_train`, `x_test`, `y_test`).
    * `path` is a file with keys `images`/`labels`: the whole file is taken
      as the requested split.

  Args:
    path: a `.npz` file or a folder of them.
    split: split name, e.g. "train" or "test".

  Returns:
    images: [N, H, W, C] as stored (a missing channel axis is added).
    labels: int32 [N].

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a readable .npz archive, none of the accepted key pairs,
      or mismatched lengths.

  References:
    NumPy, `numpy.savez` (the `.npz` format); Keras, `mnist.npz` of
    `keras.datasets.mnist.load_data`.

  Example:
    >>> import os, tempfile, numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "mnist.npz")
    >>> np.savez(path, x_train=np.zeros((3, 28, 28), np.uint8),
    ...          y_train=np.array([5, 0, 4]), x_test=np.zeros((1, 28, 28)),
    ...          y_test=np.array([7]))
    >>> images, labels = load_npz(path, "train")
    >>> images.shape, labels
    ((3, 28, 28, 1), array([5, 0, 4], dtype=int32))
  """
  file = pathlib.Path(path)
  if file.is_dir():
    file = file / f"{split}.npz"
  if not file.is_file():
    raise FileNotFoundError(
        f"No .npz file at {str(file)!r}; pass npz:FILE or npz:DIR where DIR "
        f"holds {split}.npz.")
  try:
    with np.load(file, allow_pickle=False) as data:
      keys = set(data.files)
      for image_key, label_key in ((f"x_{split}", f"y_{split}"),
                                   ("images", "labels")):
        if {image_key, label_key} <= keys:
          pair = data[image_key], data[label_key]
          break
      else:
        pair = None
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
    raise ValueError(
        f"{str(file)!r} cannot be read as a .npz file ({type(err).__name__}: "
        f"{err}); accepted: a NumPy .npz archive (np.savez) with "
        f"'images'/'labels' or 'x_{split}'/'y_{split}' arrays, no pickled "
        "objects.") from err
  if pair is not None:
    return _check(*pair, source=str(file))
  raise ValueError(
      f"{str(file)!r} has keys {sorted(keys)}; accepted: 'images'/'labels' or "
      f"'x_{split}'/'y_{split}'.")


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads one IDX file (the MNIST format), gzipped or not.

  Args:
    path: file path; a `.gz` suffix means gzip.

  Returns:
    The stored array, shape and dtype from the file's header.

  Raises:
    ValueError: malformed header or size.

  References:
    LeCun, Cortes, Burges, "The MNIST database of handwritten digits" (the
    IDX file format).

  Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")
    >>> with open(path, "wb") as f:   # magic: 0, 0, type 8 (uint8), 1 dim
    ...   _ = f.write(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big")
    ...               + bytes([7, 2, 1]))
    >>> read_idx(path)
    array([7, 2, 1], dtype=uint8)
  """
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
            0x0E: ">f8"}
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in dtypes:
    raise ValueError(
        f"{str(path)!r} is not an IDX file (magic bytes {raw[:4]!r}; expected "
        f"0, 0, a type code in {sorted(dtypes)}, ndim).")
  ndim = raw[3]
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
  dtype = np.dtype(dtypes[raw[2]])
  offset = 4 + 4 * ndim
  if len(raw) - offset != dtype.itemsize * int(np.prod(shape)):
    raise ValueError(
        f"{str(path)!r}: header shape {shape} needs "
        f"{dtype.itemsize * int(np.prod(shape))} bytes, file has "
        f"{len(raw) - offset}.")
  return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(
      dtype.newbyteorder("="))


def load_idx(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Loads MNIST-format IDX files from a folder.

  Reads `train-images-idx3-ubyte` and `train-labels-idx1-ubyte` for "train",
  `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte` for "test", each
  optionally gzipped (`.gz`), as distributed for MNIST and Fashion-MNIST.

  Args:
    directory: folder holding the files.
    split: "train" or "test".

  Returns:
    images: uint8 [N, H, W, 1].
    labels: int32 [N].

  Raises:
    ValueError: unknown split or malformed files.
    FileNotFoundError: a file is missing.

  References:
    LeCun, Cortes, Burges, "The MNIST database of handwritten digits";
    Xiao, Rasul, Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
    Benchmarking Machine Learning Algorithms", arXiv 2017 (same files).

  Example:
    >>> import os, tempfile, numpy as np
    >>> folder = tempfile.mkdtemp()
    >>> def write_idx(name, array):                     # uint8 IDX file
    ...   header = bytes([0, 0, 8, array.ndim]) + b"".join(
    ...       d.to_bytes(4, "big") for d in array.shape)
    ...   with open(os.path.join(folder, name), "wb") as f:
    ...     _ = f.write(header + array.astype(np.uint8).tobytes())
    >>> write_idx("t10k-images-idx3-ubyte", np.zeros((2, 28, 28)))
    >>> write_idx("t10k-labels-idx1-ubyte", np.array([3, 5]))
    >>> images, labels = load_idx(folder, "test")
    >>> images.shape, labels
    ((2, 28, 28, 1), array([3, 5], dtype=int32))
  """
  if split not in _IDX_FILES:
    raise ValueError(
        f"Unknown split {split!r} for IDX files; accepted: {list(_IDX_FILES)}.")
  arrays = []
  for stem in _IDX_FILES[split]:
    candidates = [pathlib.Path(directory) / (stem + s) for s in ("", ".gz")]
    found = [c for c in candidates if c.is_file()]
    if not found:
      raise FileNotFoundError(
          f"No IDX file {stem}[.gz] in {str(directory)!r} (looked for "
          f"{[str(c) for c in candidates]}).")
    arrays.append(read_idx(found[0]))
  return _check(*arrays, source=str(directory))


def load_image_folder(
    directory: str, *, split: str | None = None,
    image_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Loads a folder with one sub-folder of images per class.

  Layout: `directory/[split/]CLASS/IMAGE`. If `directory/split` exists it is
  used, otherwise `directory` itself. The class index is the position of the
  class folder's name in sorted order; images are read in sorted file-name
  order. Files with other extensions (e.g. GTSRB's `.csv`) and hidden files
  are skipped. Binary PGM/PPM (GTSRB's format) and `.npy` are read with
  numpy; PNG, JPEG and the rest need Pillow. Grayscale images are broadcast to
  RGB when the folder mixes both.

  Args:
    directory: the root folder.
    split: optional split sub-folder name (see above).
    image_size: (height, width) to resize to (Pillow, Lanczos); needed when
      the images differ in size.

  Returns:
    images: uint8 [N, H, W, C] (C is 1 or 3).
    labels: int32 [N].

  Raises:
    FileNotFoundError: `directory` does not exist or holds no images.
    ValueError: images of different sizes and no `image_size`.

  References:
    Stallkamp, Schlipsing, Salmen, Igel, "Man vs. computer: Benchmarking
    machine learning algorithms for traffic sign recognition", Neural
    Networks 2012 (GTSRB's class folders of PPM images).

  Example:
    >>> import os, tempfile, numpy as np
    >>> root = tempfile.mkdtemp()
    >>> for name in ("cat", "dog"):                     # classes 0 and 1
    ...   os.makedirs(os.path.join(root, name))
    ...   np.save(os.path.join(root, name, "0.npy"),
    ...           np.zeros((4, 4, 3), np.uint8))
    >>> images, labels = load_image_folder(root)
    >>> images.shape, labels
    ((2, 4, 4, 3), array([0, 1], dtype=int32))
  """
  root = pathlib.Path(directory)
  if split is not None and (root / split).is_dir():
    root = root / split
  if not root.is_dir():
    raise FileNotFoundError(f"No image folder at {str(root)!r}.")
  classes = sorted(p.name for p in root.iterdir()
                   if p.is_dir() and not p.name.startswith("."))
  images, labels = [], []
  for label, name in enumerate(classes):
    for file in sorted((root / name).iterdir()):
      if (file.name.startswith(".") or not file.is_file()
          or file.suffix.lower() not in _IMAGE_EXTENSIONS):
        continue
      image = read_image(file)
      if image_size is not None and image.shape[:2] != tuple(image_size):
        image = resize_images(image[None], image_size)[0]
      images.append(image)
      labels.append(label)
  if not images:
    raise FileNotFoundError(
        f"No images in {str(root)!r}: expected one sub-folder per class "
        f"holding files with extensions {list(_IMAGE_EXTENSIONS)}.")
  sizes = sorted({im.shape[:2] for im in images})
  if len(sizes) > 1:
    raise ValueError(
        f"Images in {str(root)!r} have different sizes {sizes[:5]}; pass "
        "image_size=(height, width) to resize them.")
  if len({im.shape[2] for im in images}) > 1:
    images = [np.broadcast_to(im, im.shape[:2] + (3,)) for im in images]
  return np.stack(images), np.asarray(labels, np.int32)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads one image file as uint8 [H, W, C] (C is 1 or 3).

  Args:
    path: `.npy` (uint8 [H, W] or [H, W, C]), binary `.pgm`/`.ppm` (8-bit),
      or any format Pillow reads (PNG, JPEG, ...; converted to L or RGB).

  Returns:
    uint8 [H, W, C].

  Raises:
    ImportError: the format needs Pillow and it is not installed.

  References:
    Netpbm, the PGM and PPM format specifications; Pillow, `Image.open`.

  Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "image.pgm")
    >>> with open(path, "wb") as f:                     # 2 x 1 binary PGM
    ...   _ = f.write(b"P5 2 1 255 " + bytes([0, 255]))
    >>> read_image(path)[..., 0]
    array([[  0, 255]], dtype=uint8)
  """
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if suffix == ".npy":
    image = np.load(path, allow_pickle=False)
  elif suffix in (".pgm", ".ppm", ".pnm") and _is_binary_netpbm(path):
    image = _read_netpbm(path)
  else:
    image_module = _pil_image()
    with image_module.open(path) as pil:
      pil = pil.convert("L" if pil.mode in ("1", "L", "I;16", "I", "F")
                        else "RGB")
      image = np.asarray(pil)
  if image.ndim == 2:
    image = image[:, :, None]
  return image.astype(np.uint8)


def _is_binary_netpbm(path: pathlib.Path) -> bool:
  with open(path, "rb") as f:
    return f.read(2) in (b"P5", b"P6")


def _read_netpbm(path: pathlib.Path) -> np.ndarray:
  """Reads binary 8-bit PGM (P5) / PPM (P6) with numpy."""
  raw = path.read_bytes()
  fields, pos = [], 2
  while len(fields) < 3:  # width, height, maxval; '#' starts a comment.
    while raw[pos:pos + 1].isspace():
      pos += 1
    if raw[pos:pos + 1] == b"#":
      pos = raw.index(b"\n", pos) + 1
      continue
    end = pos
    while raw[end:end + 1].isdigit():
      end += 1
    fields.append(int(raw[pos:end]))
    pos = end
  width, height, maxval = fields
  if maxval > 255:
    raise ValueError(f"{str(path)!r}: 16-bit netpbm (maxval {maxval}) is not "
                     "supported; accepted: maxval <= 255.")
  channels = 3 if raw[:2] == b"P6" else 1
  data = np.frombuffer(raw, np.uint8, width * height * channels, offset=pos + 1)
  return data.reshape(height, width, channels)


def _pil_image() -> Any:
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "Decoding or resizing images needs Pillow: pip install pillow "
        "(PGM/PPM and .npy images are read without it).") from e
  return Image


def resize_images(images: np.ndarray,
                  image_size: tuple[int, int]) -> np.ndarray:
  """Resizes uint8 images with Pillow's Lanczos filter (the paper's ANTIALIAS).

  Args:
    images: uint8 [N, H, W, C], C in {1, 3}.
    image_size: (height, width).

  Returns:
    uint8 [N, height, width, C].

  Raises:
    ValueError: images are not uint8.

  References:
    Pillow, `Image.resize` with `Resampling.LANCZOS` (formerly `ANTIALIAS`);
    RAR spec Sec. 5.3 (Flower images resized to 128x128).

  Example:
    >>> import numpy as np
    >>> resize_images(np.full((1, 4, 4, 1), 200, np.uint8), (2, 2))[..., 0]
    array([[[200, 200],
            [200, 200]]], dtype=uint8)
  """
  height, width = image_size
  if images.shape[1:3] == (height, width):
    return images
  if images.dtype != np.uint8:
    raise ValueError(
        f"resize_images needs uint8 images (0..255); got dtype {images.dtype}.")
  image_module = _pil_image()
  out = np.empty((len(images), height, width, images.shape[-1]), np.uint8)
  for i, image in enumerate(images):
    pil = image_module.fromarray(
        image[:, :, 0] if image.shape[-1] == 1 else image)
    resized = np.asarray(pil.resize((width, height),
                                    image_module.Resampling.LANCZOS))
    out[i] = resized.reshape(out.shape[1:])
  return out


def _load_tfds_uint8(name: str, split: str, *, data_dir: str | None,
                     image_size: tuple[int, int] | None,
                     download: bool) -> tuple[np.ndarray, np.ndarray]:
  """Reads a tfds split with `tfds.data_source` (random access, no TF)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir,
                              download=download)
  except Exception as e:  # pylint: disable=broad-exception-caught
    where = data_dir or "the default tfds data_dir ($TFDS_DATA_DIR or " \
        "~/tensorflow_datasets)"
    raise FileNotFoundError(
        f"Could not open tfds dataset {name!r} split {split!r} in {where}: "
        f"{type(e).__name__}: {e}\nReading needs the dataset prepared in the "
        "array_record format; preparing it needs TensorFlow and the network "
        "once: pip install 'rar-jax[tf]' (or tensorflow), then "
        f"`tfds build {name} --file_format=array_record"
        f"{' --data_dir=' + data_dir if data_dir else ''}`, or pass "
        "download=True. Offline, use `npz:`, `idx:` or `folder:` files, or "
        "'embedded_mnist'.") from e
  images, labels = [], []
  for i in range(len(source)):
    example = source[i]
    image = np.asarray(example["image"], np.uint8)
    if image.ndim == 2:
      image = image[:, :, None]
    if image_size is not None:
      image = resize_images(image[None], image_size)[0]
    images.append(image)
    labels.append(int(example["label"]))
  if not images:
    raise ValueError(f"tfds dataset {name!r} split {split!r} is empty.")
  sizes = sorted({im.shape for im in images})
  if len(sizes) > 1:
    raise ValueError(
        f"tfds dataset {name!r} has images of different shapes {sizes[:5]}; "
        "pass image_size=(height, width).")
  return np.stack(images), np.asarray(labels, np.int32)


def _check(images: np.ndarray, labels: np.ndarray,
           *, source: str) -> tuple[np.ndarray, np.ndarray]:
  """Adds a channel axis to [N, H, W] images and validates the pair."""
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(
        f"{source}: images must be [N, H, W] or [N, H, W, C]; got shape "
        f"{images.shape}.")
  if labels.ndim != 1 or len(labels) != len(images):
    raise ValueError(
        f"{source}: labels must be [N] with N = {len(images)} images; got "
        f"shape {labels.shape}.")
  return images, labels.astype(np.int32)

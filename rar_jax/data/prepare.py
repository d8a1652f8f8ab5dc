r"""Prepares GTSRB and Flower-17 as the paper did, into `.npz` files.

  python -m rar_jax.data.prepare gtsrb --source=DIR --output=OUT
  python -m rar_jax.data.prepare flower17 --source=DIR --output=OUT

Both write `OUT/train.npz` and `OUT/test.npz` (keys `images` uint8
[N, H, W, 3], `labels` int32 [N]), which `load_dataset("npz:OUT", split)`
reads as float32 in [0, 255].

* gtsrb: `DIR` holds the Udacity pickles `train.p` / `test.p` (and optionally
  `valid.p`; dicts with `features` uint8 [N, 32, 32, 3] and `labels`), or
  `train.npz` / `test.npz` (keys `images`, `labels`), or image folders
  `train/CLASS/*` / `test/CLASS/*` (resized to 32x32). Each channel of each
  image is histogram-equalised (`cv2.equalizeHist`). The paper's code
  equalises at load time; doing it once here gives the same arrays.
* flower17: `DIR` is the Oxford 17 Category Flowers `jpg/` folder, or the
  folder that holds it (where `17flowers.tgz` was extracted)
  (`image_0001.jpg` .. `image_1360.jpg`; class = consecutive blocks of 80
  file numbers, in the order of the dataset's class list, Daffodil first).
  Images are resized to 128x128 (Lanczos, PIL's former ANTIALIAS), shuffled
  with `np.random.seed(4557077)`, and the first 72 per class in shuffled
  order form the train set (1,224), the other 8 per class the test set (136).

Both then fill every class of the train split up to the paper's count
(`--balance_per_class`: GTSRB 10,000, Flower 1,000; 0 keeps the originals
only) with rotated, translated and projectively warped copies, as the
original `generate_data.py` (`rar_jax.data.augment`). GTSRB's copies are made
from the raw images and then equalised with them, as the original, which
equalised at load time. The original's GTSRB augmentation was unseeded;
here `--augment_seed` (default 0) fixes it. For Flower the original seeded
NumPy with 12312, but building the dataset reseeded it with 4557077 for the
shuffle, so a first run drew its copies from the state after that shuffle:
that is the default here (`--augment_seed` replaces it). The draws do not
fall on the same images as the original's, whose order of files came from
`os.walk` (see also the class numbering below).
The paper's code numbered the Flower classes by the
lexicographic order of folder names "0".."16" (so its label 2 is block 10);
here label k is block k, matching the dataset's class list.

References:
  Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (spec Sec.
  5.2-5.3); Nilsback & Zisserman 2006 (17 Category Flowers); Stallkamp et
  al. 2012 (GTSRB).
"""

import argparse
import pathlib
import pickle
import re
import sys
from typing import Optional, Sequence

import numpy as np

from rar_jax.data import augment
from rar_jax.data import sources

FLOWER17_SEED = 4557077
GTSRB_PER_CLASS = 10_000   # the paper's balanced class sizes
FLOWER17_PER_CLASS = 1_000
_GTSRB_SIZE = (32, 32)
_FLOWER_SIZE = (128, 128)


def equalize_hist(image: np.ndarray) -> np.ndarray:
  """Histogram equalisation of one 8-bit channel, as `cv2.equalizeHist`.

  OpenCV maps value v to `round(255 * (cdf(v) - h0) / (n - h0))`, where h0 is
  the count of the smallest value present (which maps to 0), computed in
  float32 and rounded half to even; a constant image is returned unchanged.

  Args:
    image: uint8 [H, W].

  Returns:
    uint8 [H, W].

  References:
    OpenCV, `cv2.equalizeHist`; RAR spec Sec. 5.2 (GTSRB preprocessing).

  Example:
    >>> import numpy as np
    >>> equalize_hist(np.array([[0, 50], [50, 200]], np.uint8))
    array([[  0, 170],
           [170, 255]], dtype=uint8)
  """
  return equalize_images(image[None, :, :, None])[0, :, :, 0]


def equalize_images(images: np.ndarray, *,
                    chunk_size: int = 4096) -> np.ndarray:
  """Equalises the histogram of every channel of every image independently.

  Args:
    images: uint8 [N, H, W, C].
    chunk_size: images processed at once (bounds the memory of the LUTs).

  Returns:
    uint8 [N, H, W, C].

  Raises:
    ValueError: not uint8 [N, H, W, C].

  References:
    OpenCV, `cv2.equalizeHist`; RAR spec Sec. 5.2 (each channel of each
    GTSRB image).

  Example:
    >>> import numpy as np
    >>> images = np.stack([np.full((2, 2, 3), 9, np.uint8),
    ...                    np.array([[0, 50], [50, 200]], np.uint8)[..., None]
    ...                    .repeat(3, axis=-1)])      # [2, 2, 2, 3]
    >>> equalize_images(images)[:, :, :, 0]           # a constant image stays
    array([[[  9,   9],
            [  9,   9]],
    <BLANKLINE>
           [[  0, 170],
            [170, 255]]], dtype=uint8)
  """
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(
        f"equalize_images needs uint8 [N, H, W, C]; got {images.dtype} "
        f"{images.shape}.")
  out = np.empty_like(images)
  for start in range(0, len(images), chunk_size):
    out[start:start + chunk_size] = _equalize_chunk(
        images[start:start + chunk_size])
  return out


def _equalize_chunk(images: np.ndarray) -> np.ndarray:
  n, height, width, channels = images.shape
  total = height * width
  # One 256-bin histogram per (image, channel).
  flat = np.moveaxis(images, 3, 1).reshape(n * channels, total)
  offsets = (np.arange(n * channels) * 256)[:, None]
  hist = np.bincount((flat + offsets).ravel(),
                     minlength=n * channels * 256).reshape(n * channels, 256)
  first = np.argmax(hist > 0, axis=1)
  first_count = hist[np.arange(n * channels), first][:, None]
  cdf = np.cumsum(hist, axis=1) - first_count
  constant = first_count[:, 0] == total
  scale = np.float32(255.0) / np.maximum(total - first_count, 1).astype(
      np.float32)
  lut = np.rint(cdf.astype(np.float32) * scale)
  lut = np.clip(lut, 0, 255).astype(np.uint8)
  lut[constant] = first[constant, None]  # cv2: dst.setTo(first value).
  equalised = np.take_along_axis(lut, flat.astype(np.intp), axis=1)
  return np.moveaxis(equalised.reshape(n, channels, height, width), 1, 3)


def split_per_class(labels: np.ndarray, *,
                    num_train_per_class: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits per class: the first `num_train_per_class` train, the rest test.

  Args:
    labels: int [N], in the (shuffled) order that decides the split.
    num_train_per_class: train examples per class (paper: 72).

  Returns:
    train_index: int64 [N_train], increasing.
    test_index: int64 [N - N_train], increasing.

  References:
    RAR spec Sec. 5.3 (Flower-17: 72 train and 8 test images per class).

  Example:
    >>> import numpy as np
    >>> split_per_class(np.array([0, 1, 0, 1, 0]), num_train_per_class=2)
    (array([0, 1, 2, 3]), array([4]))
  """
  labels = np.asarray(labels)
  seen = np.zeros(labels.max() + 1, np.int64) if len(labels) else np.zeros(0)
  is_train = np.zeros(len(labels), bool)
  for i, label in enumerate(labels):
    is_train[i] = seen[label] < num_train_per_class
    seen[label] += 1
  return np.flatnonzero(is_train), np.flatnonzero(~is_train)


def prepare_flower17(source: str, output: str, *,
                     image_size: tuple[int, int] = _FLOWER_SIZE,
                     images_per_class: int = 80,
                     num_train_per_class: int = 72,
                     seed: int = FLOWER17_SEED,
                     balance_per_class: int = FLOWER17_PER_CLASS,
                     augment_seed: Optional[int] = None) -> dict[str, int]:
  """Builds the paper's Flower-17 train/test `.npz` files (module docstring).

  Args:
    source: folder with `image_NNNN.jpg` (any image extension), numbered from
      1, or a folder whose `jpg/` sub-folder has them (the dataset's archive
      extracted); class = (NNNN - 1) // images_per_class.
    output: folder to write `train.npz` and `test.npz` to (created).
    image_size: (height, width) of the stored images.
    images_per_class: size of each block of consecutive file numbers.
    num_train_per_class: train images per class; the rest are test.
    seed: `np.random.seed` of the shuffle (paper: 4557077).
    balance_per_class: fill every train class up to this many images with
      distorted copies (`augment.balance_classes`; paper: 1,000); 0: no
      copies.
    augment_seed: seed of the copies' distortions; None: continue from the
      shuffle's random state, as a first run of the original.

  Returns:
    {"train": N_train, "test": N_test}.

  Raises:
    FileNotFoundError: `source` is not a folder, or neither it nor its
      `jpg/` sub-folder has `image_NNNN.*` files.
    ValueError: `balance_per_class` < 0.

  References:
    Nilsback, Zisserman, "A Visual Vocabulary for Flower Classification",
    CVPR 2006 (the 17 Category Flowers); RAR spec Sec. 5.3.

  Example:
    >>> import os, tempfile, numpy as np
    >>> from PIL import Image
    >>> source, output = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> for i in range(1, 7):                 # 2 classes of 3 images
    ...   Image.fromarray(np.full((8, 6, 3), 10 * i, np.uint8)).save(
    ...       os.path.join(source, f"image_{i:04d}.png"))
    >>> prepare_flower17(source, output, image_size=(4, 4),
    ...                  images_per_class=3, num_train_per_class=2,
    ...                  balance_per_class=5)        # 2 originals + 3 copies
    {'train': 10, 'test': 2}
    >>> sorted(os.listdir(output))
    ['test.npz', 'train.npz']
  """
  _check_balance(balance_per_class)
  pattern = re.compile(r"image_(\d+)\.[A-Za-z]+$")
  root = pathlib.Path(source)
  if not root.is_dir():
    raise FileNotFoundError(
        f"Flower-17 source {source!r} is not a folder; accepted: the "
        "dataset's 'jpg/' folder of image_NNNN.jpg files, or the folder that "
        "holds it.")

  def numbered(folder):
    return sorted(
        (int(m.group(1)), p) for p in folder.iterdir()
        if (m := pattern.match(p.name)) and not p.name.startswith("."))

  files = numbered(root)
  if not files and (root / "jpg").is_dir():
    files = numbered(root / "jpg")
  if not files:
    raise FileNotFoundError(
        f"No image_NNNN.jpg files in {source!r} or its 'jpg/' sub-folder; "
        "accepted: the Flower-17 'jpg/' folder, or the folder that holds it.")
  images = np.stack([
      sources.resize_images(_to_rgb(sources.read_image(p))[None],
                            image_size)[0] for _, p in files])
  labels = np.asarray([(number - 1) // images_per_class
                       for number, _ in files], np.int32)
  # Paper: np.random.seed(4557077); p = np.random.permutation(N).
  rng = np.random.RandomState(seed)
  order = rng.permutation(len(images))
  images, labels = images[order], labels[order]
  train, test = split_per_class(labels,
                                num_train_per_class=num_train_per_class)
  train_x, train_y = images[train], labels[train]
  if balance_per_class:
    if augment_seed is not None:
      rng = np.random.RandomState(augment_seed)
    train_x, train_y = augment.balance_classes(train_x, train_y,
                                               balance_per_class, rng)
  return _write(output, {"train": (train_x, train_y),
                         "test": (images[test], labels[test])})


def _check_balance(balance_per_class):
  if int(balance_per_class) < 0:
    raise ValueError(
        f"balance_per_class must be >= 0 (0: no augmented copies); got "
        f"{balance_per_class}.")


def prepare_gtsrb(source: str, output: str, *,
                  balance_per_class: int = GTSRB_PER_CLASS,
                  augment_seed: int = 0) -> dict[str, int]:
  """Histogram-equalises GTSRB into `.npz` files (module docstring).

  Args:
    source: folder with `train.p`/`test.p` (optionally `valid.p`), or
      `train.npz`/`test.npz`, or `train/CLASS/*` and `test/CLASS/*` images.
      Pickles run code when loaded: use only trusted files.
    output: folder to write `train.npz`, `test.npz` (and `valid.npz`) to.
    balance_per_class: fill every train class up to this many images with
      distorted copies of its raw images before equalising
      (`augment.balance_classes`; paper: 10,000); 0: no copies.
    augment_seed: seed of the copies' distortions (the original had none).

  Returns:
    Number of images per written split.

  Raises:
    FileNotFoundError: none of the accepted layouts in `source`.
    ValueError: `balance_per_class` < 0, or a train class with no image.

  References:
    Stallkamp, Schlipsing, Salmen, Igel, "Man vs. computer: Benchmarking
    machine learning algorithms for traffic sign recognition", Neural
    Networks 2012 (GTSRB); RAR spec Sec. 5.2.

  Example:
    >>> import os, tempfile, numpy as np
    >>> source, output = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> for split, n in (("train", 3), ("test", 2)):
    ...   np.savez(os.path.join(source, f"{split}.npz"), labels=np.arange(n),
    ...            images=np.zeros((n, 32, 32, 3), np.uint8))
    >>> prepare_gtsrb(source, output, balance_per_class=2)  # 3 x 1 + 3 x 1
    {'train': 6, 'test': 2}
  """
  _check_balance(balance_per_class)
  root = pathlib.Path(source)
  splits = {}
  for split in ("train", "valid", "test"):
    if (root / f"{split}.p").is_file():
      with open(root / f"{split}.p", "rb") as f:
        data = pickle.load(f)
      images, labels = data["features"], data["labels"]
    elif (root / f"{split}.npz").is_file():
      images, labels = sources.load_npz(str(root / f"{split}.npz"), split)
    elif (root / split).is_dir():
      images, labels = sources.load_image_folder(str(root / split),
                                                 image_size=_GTSRB_SIZE)
    else:
      continue
    splits[split] = (_to_rgb(np.asarray(images, np.uint8)),
                     np.asarray(labels, np.int32))
  if not {"train", "test"} <= set(splits):
    raise FileNotFoundError(
        f"GTSRB source {source!r} needs train and test data as train.p/test.p "
        "(Udacity pickles), train.npz/test.npz (images, labels) or "
        f"train/ and test/ class folders; found splits {sorted(splits)}.")
  if balance_per_class:
    splits["train"] = augment.balance_classes(
        *splits["train"], balance_per_class,
        np.random.RandomState(augment_seed))
  return _write(output, {split: (equalize_images(images), labels)
                         for split, (images, labels) in splits.items()})


def _to_rgb(images: np.ndarray) -> np.ndarray:
  """Broadcasts 1-channel images ([..., H, W, 1]) to 3 channels."""
  if images.shape[-1] == 1:
    return np.broadcast_to(images, images.shape[:-1] + (3,)).copy()
  return images


def _write(output: str, splits) -> dict[str, int]:
  out = pathlib.Path(output)
  out.mkdir(parents=True, exist_ok=True)
  for split, (images, labels) in splits.items():
    np.savez_compressed(out / f"{split}.npz", images=images,
                        labels=labels.astype(np.int32))
  return {split: len(labels) for split, (_, labels) in splits.items()}


def main(argv: Sequence[str] | None = None) -> None:
  """The command line, `python -m rar_jax.data.prepare DATASET ...`.

  Args:
    argv: the arguments after the program name (None: `sys.argv[1:]`):
      `gtsrb` or `flower17`, `--source`, `--output`,
      `--balance_per_class`, `--augment_seed`, and for flower17
      `--images_per_class`, `--num_train_per_class`, `--image_size`, `--seed`.

  Raises:
    SystemExit: bad flags (status 2), or a `--source` without the dataset's
      files (status 1, one line on stderr naming the folder and what is
      accepted).

  References:
    RAR spec Sec. 5.2-5.3 (the paper's GTSRB and Flower preprocessing).

  Example:
    >>> import os, tempfile, numpy as np
    >>> source, output = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> for split in ("train", "test"):
    ...   np.savez(os.path.join(source, f"{split}.npz"), labels=np.arange(2),
    ...            images=np.zeros((2, 32, 32, 3), np.uint8))
    >>> main(["gtsrb", f"--source={source}", f"--output={output}",
    ...       "--balance_per_class=0"])
    >>> sorted(os.listdir(output))
    ['test.npz', 'train.npz']
  """
  parser = argparse.ArgumentParser(
      prog="python -m rar_jax.data.prepare",
      description="Prepare GTSRB or Flower-17 as in the RAR paper.")
  parser.add_argument("dataset", choices=["gtsrb", "flower17"])
  parser.add_argument("--source", required=True,
                      help="input folder (see the module docstring)")
  parser.add_argument("--output", required=True,
                      help="output folder for train.npz / test.npz")
  parser.add_argument("--images_per_class", type=int, default=80,
                      help="flower17: file numbers per class block")
  parser.add_argument("--num_train_per_class", type=int, default=72,
                      help="flower17: train images per class")
  parser.add_argument("--image_size", type=int, default=_FLOWER_SIZE[0],
                      help="flower17: side of the square output images")
  parser.add_argument("--seed", type=int, default=FLOWER17_SEED,
                      help="flower17: shuffle seed")
  parser.add_argument(
      "--balance_per_class", type=int, default=None,
      help="fill every train class up to this many images with augmented "
      f"copies (default: the paper's, gtsrb {GTSRB_PER_CLASS}, flower17 "
      f"{FLOWER17_PER_CLASS}); 0: originals only")
  parser.add_argument(
      "--augment_seed", type=int, default=None,
      help="seed of the copies' distortions (default: gtsrb 0; flower17 the "
      "shuffle's random state, as the original)")
  args = parser.parse_args(argv)
  if args.balance_per_class is not None and args.balance_per_class < 0:
    parser.error("--balance_per_class must be >= 0 (0: no augmented "
                 f"copies); got {args.balance_per_class}")
  try:
    if args.dataset == "gtsrb":
      counts = prepare_gtsrb(
          args.source, args.output,
          balance_per_class=_default(args.balance_per_class, GTSRB_PER_CLASS),
          augment_seed=_default(args.augment_seed, 0))
    else:
      counts = prepare_flower17(
          args.source, args.output,
          image_size=(args.image_size, args.image_size),
          images_per_class=args.images_per_class,
          num_train_per_class=args.num_train_per_class, seed=args.seed,
          balance_per_class=_default(args.balance_per_class,
                                     FLOWER17_PER_CLASS),
          augment_seed=args.augment_seed)
  except FileNotFoundError as e:
    # A wrong --source: one line, status 1 (as the training binary).
    parser.exit(1, f"{parser.prog}: error: {e}\n")
  print(f"Wrote {counts} images to {args.output}", file=sys.stderr)


def _default(value, default):
  return default if value is None else value


if __name__ == "__main__":
  main()

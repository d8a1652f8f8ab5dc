"""Tests for rar_jax.data: sources, preparation, deterministic batching."""

import gzip
import hashlib
import itertools
import pickle
import struct

import jax
import numpy as np
import pytest

from rar_jax import data
from rar_jax.data import augment
from rar_jax.data import prepare

_RNG = np.random.default_rng(0)


# --- Embedded MNIST sample --------------------------------------------------

def test_embedded_mnist_shapes_range_and_labels():
  train_x, train_y = data.load_embedded_mnist("train")
  test_x, test_y = data.load_dataset("embedded_mnist", "test")
  assert train_x.shape == (2500, 28, 28, 1) and train_y.shape == (2500,)
  assert test_x.shape == (500, 28, 28, 1) and test_y.shape == (500,)
  for x, y in ((train_x, train_y), (test_x, test_y)):
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert x.min() == 0.0 and x.max() == 1.0
    assert 0.05 < x.mean() < 0.25  # Mostly black digits.
  # Class counts recorded in rar_jax/data/README.md.
  np.testing.assert_array_equal(
      np.bincount(train_y, minlength=10),
      [230, 281, 241, 283, 252, 207, 248, 256, 243, 259])
  np.testing.assert_array_equal(
      np.bincount(test_y, minlength=10),
      [44, 43, 59, 55, 60, 38, 51, 59, 47, 44])
  # Pixels are k/255 exactly as TF's reader makes them (x * float32(1/255)).
  k = np.rint(train_x * 255)
  np.testing.assert_array_equal(train_x, k.astype(np.float32)
                                * np.float32(1 / 255))


def test_keep_integers_converts_each_batch_as_the_whole_split(tmp_path):
  for name, pixel_max in (("embedded_mnist", None), ("embedded_mnist", 255.0)):
    full, labels = data.load_dataset(name, "test", pixel_max=pixel_max)
    kept, kept_labels = data.load_dataset(name, "test", pixel_max=pixel_max,
                                          keep_integers=True)
    assert isinstance(kept, data.ScaledPixels)
    assert kept.stored.dtype == np.uint8 and kept.dtype == np.float32
    assert kept.shape == full.shape and len(kept) == len(full)
    np.testing.assert_array_equal(kept_labels, labels)
    np.testing.assert_array_equal(np.asarray(kept), full)   # bit for bit
    assert kept.value_range() == (float(full.min()), float(full.max()))
    for (bx, by), (fx, fy) in zip(
        data.batches(kept, labels, batch_size=64, seed=3, num_epochs=1),
        data.batches(full, labels, batch_size=64, seed=3, num_epochs=1)):
      assert bx.dtype == np.float32
      np.testing.assert_array_equal(bx, fx)
      np.testing.assert_array_equal(by, fy)
  # Float sources stay float arrays.
  np.savez(tmp_path / "f.npz", images=np.full((2, 2, 2, 1), 0.5, np.float32),
           labels=np.array([0, 1]))
  floats, _ = data.load_dataset(f"npz:{tmp_path / 'f.npz'}", "train",
                                keep_integers=True)
  assert isinstance(floats, np.ndarray) and floats.dtype == np.float32
  with pytest.raises(ValueError, match="uint8 images; got dtype float32"):
    data.ScaledPixels(floats, pixel_max=1.0)
  with pytest.raises(ValueError, match="pixel_max must be a finite number > 0; "
                     "got -1"):
    data.ScaledPixels(np.zeros(2, np.uint8), pixel_max=-1)
  # The range is the data's, not the nominal [0, pixel_max].
  mid = data.ScaledPixels(np.array([10, 200, 37], np.uint8), pixel_max=1.0)
  assert mid.value_range() == (float(np.float32(10) * np.float32(1 / 255)),
                               float(np.float32(200) * np.float32(1 / 255)))


def test_embedded_mnist_bad_split():
  with pytest.raises(ValueError, match="'validation'.*'train', 'test'"):
    data.load_embedded_mnist("validation")


# --- tensorflow-datasets (mocked: no network, no TensorFlow) -----------------

@pytest.fixture(scope="module", name="tfds")
def _tfds():
  return pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_tfds_mnist_like(tfds, name):
  with tfds.testing.mock_data(num_examples=6):
    images, labels = data.load_dataset(name, "train")
  assert images.shape == (6, 28, 28, 1) and images.dtype == np.float32
  assert labels.shape == (6,) and labels.dtype == np.int32
  assert 0.0 <= images.min() and images.max() <= 1.0
  assert 0 <= labels.min() and labels.max() < 10


def test_tfds_flowers_resized_to_fixed_size(tfds):
  pytest.importorskip("PIL")
  # Mock flower images have random, different sizes.
  with tfds.testing.mock_data(num_examples=5):
    images, labels = data.load_dataset("oxford_flowers102", "test",
                                       image_size=(16, 16))
    default, _ = data.load_dataset("oxford_flowers102", "train")
  assert images.shape == (5, 16, 16, 3) and labels.shape == (5,)
  assert default.shape == (5, 128, 128, 3)
  assert images.max() > 1.0 and images.max() <= 255.0  # Paper range.


def test_tfds_missing_dataset_gives_clear_error(tfds, tmp_path):
  del tfds
  with pytest.raises(FileNotFoundError,
                     match=r"(?s)'mnist'.*array_record.*tensorflow"):
    data.load_dataset("mnist", "train", data_dir=str(tmp_path))


# --- .npz -------------------------------------------------------------------

def test_npz_layouts(tmp_path):
  images = _RNG.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
  labels = np.arange(5, dtype=np.uint8)
  np.savez(tmp_path / "single.npz", images=images, labels=labels)
  x, y = data.load_dataset(f"npz:{tmp_path / 'single.npz'}", "train")
  np.testing.assert_array_equal(x, images.astype(np.float32))  # [0, 255].
  assert y.dtype == np.int32 and list(y) == list(range(5))

  # Keras-style keys, grayscale [N, H, W] gets a channel axis.
  np.savez(tmp_path / "keras.npz", x_train=images[:3, :, :, 0],
           y_train=labels[:3], x_test=images[3:, :, :, 0], y_test=labels[3:])
  x, y = data.load_dataset(f"npz:{tmp_path / 'keras.npz'}", "test",
                           pixel_max=1.0)
  assert x.shape == (2, 4, 4, 1) and list(y) == [3, 4]
  np.testing.assert_allclose(x[..., 0], images[3:, :, :, 0] / 255, rtol=1e-6)

  # A folder of {split}.npz, as written by `prepare`; float pixels unchanged.
  (tmp_path / "dir").mkdir()
  floats = _RNG.uniform(size=(2, 3, 3, 1)).astype(np.float64)
  np.savez(tmp_path / "dir" / "test.npz", images=floats, labels=[1, 0])
  x, y = data.load_dataset(f"npz:{tmp_path / 'dir'}", "test")
  np.testing.assert_allclose(x, floats.astype(np.float32))
  assert x.dtype == np.float32 and list(y) == [1, 0]


def test_split_rows_partition_one_file(tmp_path):
  # One .npz of images/labels split in two by rows (the CPU reproduction's
  # 8,000 / 2,000 split of mnist_10k.npz), also for the embedded sample.
  images = _RNG.integers(0, 256, (10, 4, 4), dtype=np.uint8)
  np.savez(tmp_path / "all.npz", images=images, labels=np.arange(10))
  name = f"npz:{tmp_path / 'all.npz'}"
  x_a, y_a = data.load_dataset(name, "train[:7]", pixel_max=1.0)
  x_b, y_b = data.load_dataset(name, "train[7:]", pixel_max=1.0)
  assert list(y_a) == list(range(7)) and list(y_b) == [7, 8, 9]
  np.testing.assert_allclose(np.concatenate([x_a, x_b])[..., 0],
                             images / 255, rtol=1e-6)
  x, _ = data.load_dataset("embedded_mnist", "test[-5:]")
  np.testing.assert_array_equal(
      x, data.load_dataset("embedded_mnist", "test")[0][-5:])
  with pytest.raises(ValueError, match=r"split='train\[a:b\]' is not "
                     r"accepted; accepted: NAME or NAME\[START:STOP\]"):
    data.load_dataset(name, "train[a:b]")


def test_npz_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="train.npz"):
    data.load_dataset(f"npz:{tmp_path}", "train")
  np.savez(tmp_path / "bad.npz", pixels=np.zeros((2, 2, 2)), y=[0, 1])
  with pytest.raises(ValueError, match=r"\['pixels', 'y'\].*'images'/'labels'"):
    data.load_dataset(f"npz:{tmp_path / 'bad.npz'}", "train")
  np.savez(tmp_path / "short.npz", images=np.zeros((3, 2, 2)), labels=[0])
  with pytest.raises(ValueError, match="N = 3"):
    data.load_dataset(f"npz:{tmp_path / 'short.npz'}", "train")


# --- IDX --------------------------------------------------------------------

def _idx_bytes(array):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
  header += struct.pack(">" + "I" * array.ndim, *array.shape)
  return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gzipped", [False, True])
def test_idx_files(tmp_path, gzipped):
  splits = {"train": (7, "train"), "test": (3, "t10k")}
  expected = {}
  for split, (n, stem) in splits.items():
    images = _RNG.integers(0, 256, (n, 5, 6), dtype=np.uint8)
    labels = _RNG.integers(0, 10, n, dtype=np.uint8)
    expected[split] = (images, labels)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
      raw = _idx_bytes(array)
      path = tmp_path / f"{stem}-{kind}-ubyte"
      if gzipped:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
      path.write_bytes(raw)
  for split, (images, labels) in expected.items():
    x, y = data.load_dataset(f"idx:{tmp_path}", split)
    assert x.shape == images.shape + (1,) and x.dtype == np.float32
    np.testing.assert_allclose(x[..., 0] * 255, images, atol=1e-4)  # [0, 1].
    np.testing.assert_array_equal(y, labels)
  suffix = ".gz" if gzipped else ""
  np.testing.assert_array_equal(
      data.read_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}"),
      expected["test"][0])


def test_idx_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
    data.load_dataset(f"idx:{tmp_path}", "train")
  with pytest.raises(ValueError, match="'valid'.*'train', 'test'"):
    data.load_idx(str(tmp_path), "valid")
  (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x05")
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(tmp_path / "bad")
  (tmp_path / "short").write_bytes(_idx_bytes(np.zeros(4))[:-1])
  with pytest.raises(ValueError, match="needs 4 bytes"):
    data.read_idx(tmp_path / "short")


# --- Image folders ----------------------------------------------------------

def _write_ppm(path, image):
  height, width, _ = image.shape
  path.write_bytes(b"P6\n# comment\n%d %d\n255\n" % (width, height)
                   + image.tobytes())


def test_folder_of_ppm_images_without_pillow(tmp_path):
  # GTSRB's layout: class folders of .ppm images plus a .csv annotation file.
  classes = {"00001": 2, "00000": 3}
  written = {}
  for name, n in classes.items():
    (tmp_path / "train" / name).mkdir(parents=True)
    (tmp_path / "train" / name / "GT.csv").write_text("a;b\n")
    for i in range(n):
      image = _RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8)
      _write_ppm(tmp_path / "train" / name / f"{i:05d}.ppm", image)
      written[(name, i)] = image
  x, y = data.load_dataset(f"folder:{tmp_path}", "train")
  assert x.shape == (5, 4, 5, 3) and x.dtype == np.float32
  np.testing.assert_array_equal(y, [0, 0, 0, 1, 1])  # Sorted class names.
  np.testing.assert_array_equal(x[0], written[("00000", 0)])
  np.testing.assert_array_equal(x[4], written[("00001", 1)])


def test_folder_of_png_images(tmp_path):
  image_module = pytest.importorskip("PIL.Image")
  for label, name in enumerate(["cat", "dog"]):
    (tmp_path / name).mkdir()
    for i in range(2):
      size = (6, 8) if i == 0 else (5, 7)  # (width, height) differs.
      array = np.full(size[::-1], 40 * label + 10 * i, np.uint8)
      image_module.fromarray(array).save(tmp_path / name / f"{i}.png")
  with pytest.raises(ValueError, match="different sizes.*image_size"):
    data.load_dataset(f"folder:{tmp_path}", "test")
  x, y = data.load_dataset(f"folder:{tmp_path}", "test", image_size=(8, 6))
  assert x.shape == (4, 8, 6, 1) and list(y) == [0, 0, 1, 1]
  np.testing.assert_array_equal(x[:, 0, 0, 0], [0, 10, 40, 50])


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="No image folder"):
    data.load_dataset(f"folder:{tmp_path / 'missing'}", "train")
  (tmp_path / "a").mkdir()
  with pytest.raises(FileNotFoundError, match="one sub-folder per class"):
    data.load_dataset(f"folder:{tmp_path}", "train")


def test_unknown_dataset_name():
  with pytest.raises(ValueError,
                     match=r"'cifar10'.*embedded_mnist.*npz:\.\.\."):
    data.load_dataset("cifar10", "train")


# --- Preparation (GTSRB, Flower-17) -----------------------------------------

def test_equalize_hist_matches_opencv():
  x = np.array([[52, 55, 61, 59, 79], [62, 59, 55, 104, 94],
                [63, 65, 66, 113, 144], [68, 70, 70, 126, 154]], np.uint8)
  # Reference output of cv2.equalizeHist (OpenCV 5.0.0) on this input.
  expected = [[0, 27, 67, 54, 174], [81, 54, 27, 201, 188],
              [94, 107, 121, 215, 242], [134, 161, 161, 228, 255]]
  np.testing.assert_array_equal(prepare.equalize_hist(x), expected)


def test_equalize_hist_properties():
  x = (_RNG.integers(0, 60, (9, 11)) + 30).astype(np.uint8)
  out = prepare.equalize_hist(x)
  assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
  order = np.argsort(x, axis=None, kind="stable")
  assert np.all(np.diff(out.ravel()[order].astype(int)) >= 0)  # Monotone.
  np.testing.assert_array_equal(  # Equal inputs, equal outputs.
      len(np.unique(out)), len(np.unique(x)))
  constant = np.full((3, 3), 17, np.uint8)
  np.testing.assert_array_equal(prepare.equalize_hist(constant), constant)
  # Channels and images are equalised independently.
  images = _RNG.integers(0, 100, (3, 5, 5, 3), dtype=np.uint8)
  out = prepare.equalize_images(images, chunk_size=2)
  for n, c in itertools.product(range(3), range(3)):
    np.testing.assert_array_equal(out[n, :, :, c],
                                  prepare.equalize_hist(images[n, :, :, c]))


def test_prepare_gtsrb_from_udacity_pickles(tmp_path):
  source = tmp_path / "src"
  source.mkdir()
  for split, n in (("train", 6), ("test", 4)):
    features = _RNG.integers(20, 90, (n, 32, 32, 3), dtype=np.uint8)
    with open(source / f"{split}.p", "wb") as f:
      pickle.dump({"features": features, "labels": np.arange(n) % 43}, f)
  prepare.main(["gtsrb", f"--source={source}", f"--output={tmp_path / 'out'}",
                "--balance_per_class=0"])
  x, y = data.load_dataset(f"npz:{tmp_path / 'out'}", "train")
  assert x.shape == (6, 32, 32, 3) and list(y) == list(range(6))
  assert x.min() == 0.0 and x.max() == 255.0  # Equalised, [0, 255].
  x, y = data.load_dataset(f"npz:{tmp_path / 'out'}", "test")
  assert x.shape == (4, 32, 32, 3)
  with pytest.raises(FileNotFoundError, match="train.p/test.p"):
    prepare.prepare_gtsrb(str(tmp_path / "out" / "nothing"), str(tmp_path))


def test_prepare_flower17_takes_the_jpg_folder_or_the_one_above(tmp_path,
                                                                 capsys):
  image_module = pytest.importorskip("PIL.Image")
  source = tmp_path / "17flowers" / "jpg"   # as the archive extracts
  source.mkdir(parents=True)
  for number in range(1, 9):
    image_module.fromarray(np.full((6, 5, 3), number, np.uint8)).save(
        source / f"image_{number:04d}.jpg")
  common = ["flower17", "--images_per_class=4", "--num_train_per_class=3",
            "--image_size=4", "--balance_per_class=0"]
  for name, folder in (("jpg", source), ("root", source.parent)):
    prepare.main(common + [f"--source={folder}",
                           f"--output={tmp_path / name}"])
  for split in ("train", "test"):
    a, b = (np.load(tmp_path / name / f"{split}.npz") for name in ("jpg",
                                                                   "root"))
    assert len(a["labels"]) == {"train": 6, "test": 2}[split]
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
  # A folder without the images, or none at all: one line, status 1.
  (tmp_path / "empty").mkdir()
  for folder in (tmp_path / "empty", tmp_path / "missing"):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
      prepare.main(common + [f"--source={folder}",
                             f"--output={tmp_path / 'out'}"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(folder) in err, err
    assert "error:" in err and "accepted: " in err, err
  assert not (tmp_path / "out").exists()


def test_split_per_class():
  labels = np.array([2, 0, 0, 1, 2, 0, 1, 2])
  train, test = prepare.split_per_class(labels, num_train_per_class=2)
  np.testing.assert_array_equal(train, [0, 1, 2, 3, 4, 6])
  np.testing.assert_array_equal(test, [5, 7])


def test_prepare_flower17_split(tmp_path):
  image_module = pytest.importorskip("PIL.Image")
  num_classes, per_class = 3, 10
  source = tmp_path / "jpg"
  source.mkdir()
  for number in range(1, num_classes * per_class + 1):
    # Pixel value encodes the file number; sizes vary like the real set.
    array = np.full((12 + number % 3, 10, 3), number, np.uint8)
    image_module.fromarray(array).save(source / f"image_{number:04d}.png")
  prepare.main(["flower17", f"--source={source}",
                f"--output={tmp_path / 'out'}", "--images_per_class=10",
                "--num_train_per_class=8", "--image_size=8",
                "--balance_per_class=0"])
  train_x, train_y = data.load_dataset(f"npz:{tmp_path / 'out'}", "train")
  test_x, test_y = data.load_dataset(f"npz:{tmp_path / 'out'}", "test")
  assert train_x.shape == (24, 8, 8, 3) and test_x.shape == (6, 8, 8, 3)
  np.testing.assert_array_equal(np.bincount(train_y), [8, 8, 8])
  np.testing.assert_array_equal(np.bincount(test_y), [2, 2, 2])
  # Every image once, with label (number - 1) // 10.
  numbers = np.concatenate([train_x[:, 0, 0, 0], test_x[:, 0, 0, 0]])
  np.testing.assert_array_equal(np.sort(numbers), np.arange(1, 31))
  labels = np.concatenate([train_y, test_y])
  np.testing.assert_array_equal(labels, (numbers.astype(int) - 1) // 10)
  # The order follows np.random.seed(4557077); np.random.permutation(30).
  order = np.random.RandomState(4557077).permutation(30) + 1
  expected_train = [n for n in order if sum(
      (m - 1) // 10 == (n - 1) // 10 for m in order[:list(order).index(n)]) < 8]
  np.testing.assert_array_equal(train_x[:, 0, 0, 0], expected_train)


# --- The paper's class-balancing augmentation -------------------------------

def _original_draws(rng, n, height):
  """The original's draws, one `uniform` call at a time, in its order."""
  rows = []
  for _ in range(n):
    angle = rng.uniform(-15, 15)
    tx = 5 * rng.uniform() - 5 / 2
    ty = 5 * rng.uniform() - 5 / 2
    d = height * 0.3 * rng.uniform(0, 0.8)
    rows.append([angle, tx, ty, d] + [rng.uniform(-d, d) for _ in range(8)])
  return np.array(rows)


def test_augment_draws_follow_the_original_order():
  p = augment.draw_params(np.random.RandomState(12312), 7, 32)
  got = np.concatenate([np.stack([p["angle"], p["tx"], p["ty"], p["d"]], 1),
                        p["corners"]], 1)
  np.testing.assert_array_equal(
      got, _original_draws(np.random.RandomState(12312), 7, 32))
  assert np.all(np.abs(p["angle"]) <= 15) and np.all(np.abs(p["tx"]) <= 2.5)
  assert np.all(p["d"] <= 32 * 0.3 * 0.8)
  assert np.all(np.abs(p["corners"]) <= p["d"][:, None])


def test_augment_rotation_about_the_centre():
  x = _RNG.random((2, 6, 6, 3))
  same = augment.warp_edge(x, np.stack([augment.rotation_matrix(0, 6, 6)] * 2))
  np.testing.assert_array_equal(same, x)
  # 90 degrees about ((W - 1) / 2, (H - 1) / 2) permutes the pixels.
  turned = augment.warp_edge(x, np.stack([augment.rotation_matrix(90, 6, 6)]
                                         * 2))
  np.testing.assert_allclose(turned, np.rot90(x, axes=(1, 2)), atol=1e-12)
  # Edge mode: no pixel comes from outside the image, so the range holds.
  small = augment.warp_edge(x, np.stack([augment.rotation_matrix(13, 6, 6)]
                                        * 2))
  assert small.min() >= x.min() and small.max() <= x.max()
  np.testing.assert_allclose(small[:, 2:4, 2:4].mean(), x[:, 2:4, 2:4].mean(),
                             atol=0.2)


def test_augment_translation_is_opencv_bilinear_with_zero_border():
  x = _RNG.random((1, 5, 4, 2)) + 1.0
  out = augment.translate_zero(x, np.array([1.0]), np.array([-2.0]))
  expected = np.zeros_like(x)
  expected[:, :3, 1:] = x[:, 2:, :3]
  np.testing.assert_array_equal(out, expected)
  half = augment.translate_zero(x, np.array([0.5]), np.array([0.0]))
  np.testing.assert_allclose(half[:, :, 1:], (x[:, :, :-1] + x[:, :, 1:]) / 2)
  np.testing.assert_allclose(half[:, :, 0], x[:, :, 0] / 2)   # 0 outside
  # OpenCV samples at 1/32 pixel: 0.02 rounds to 1/32, 0.01 to 0.
  np.testing.assert_array_equal(
      augment.translate_zero(x, np.array([0.02]), np.array([0.0])),
      augment.translate_zero(x, np.array([1 / 32]), np.array([0.0])))
  np.testing.assert_array_equal(
      augment.translate_zero(x, np.array([0.01]), np.array([0.0])), x)


def test_augment_projective_matrix_maps_the_corners():
  corners = _RNG.uniform(-5, 5, 8)
  tl_top, tl_left, bl_bottom, bl_left, tr_top, tr_right, br_bottom, br_right = (
      corners)
  src = np.array([[tl_left, tl_top, 1], [bl_left, 32 - bl_bottom, 1],
                  [32 - br_right, 32 - br_bottom, 1], [32 - tr_right, tr_top, 1]])
  m = augment.projective_matrix(corners, 32)
  mapped = src @ m.T
  np.testing.assert_allclose(mapped[:, :2] / mapped[:, 2:],
                             [[0, 0], [0, 32], [32, 32], [32, 0]], atol=1e-9)
  assert m[2, 2] == 1.0
  np.testing.assert_allclose(augment.projective_matrix(np.zeros(8), 32),
                             np.eye(3), atol=1e-12)


def test_augment_distort_is_rotate_translate_warp_then_truncate():
  x = _RNG.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
  p = augment.draw_params(np.random.RandomState(4), 4, 16)
  y = augment.warp_edge(x * (1 / 255), np.stack(
      [augment.rotation_matrix(a, 16, 16) for a in p["angle"]]))
  y = augment.translate_zero(y, p["tx"], p["ty"])
  y = augment.warp_edge(y, np.stack([augment.projective_matrix(c, 16)
                                     for c in p["corners"]]))
  out = augment.distort(x, p)
  np.testing.assert_array_equal(out, np.floor(y * 255.0).astype(np.uint8))
  assert not np.array_equal(out, np.rint(y * 255.0).astype(np.uint8))
  # The original's float path: x / 255 * 255 truncates 33 to 32, as here.
  assert (np.array([33]) * (1 / 255) * 255.0).astype(np.uint8)[0] == 32


def test_balance_classes_fills_each_class_with_copies_in_order():
  x = _RNG.integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
  y = np.array([1, 0, 1, 2, 1, 0, 1, 1, 0])  # class 1 has 5 > 4 images
  bx, by = augment.balance_classes(x, y, 4, np.random.RandomState(3),
                                   chunk_size=2)
  np.testing.assert_array_equal(np.bincount(by), [4, 5, 4])
  np.testing.assert_array_equal(by, np.sort(by))   # grouped by class
  # Originals first, then copy i of image i % count, drawn in that order,
  # across chunks (class 2: 3 copies in chunks of 2).
  rng = np.random.RandomState(3)
  zero, two = x[y == 0], x[y == 2]
  np.testing.assert_array_equal(bx[:3], zero)
  np.testing.assert_array_equal(
      bx[3], augment.distort(zero[[0]], augment.draw_params(rng, 1, 8))[0])
  np.testing.assert_array_equal(bx[4:9], x[y == 1])   # no copies
  np.testing.assert_array_equal(bx[9], two[0])
  np.testing.assert_array_equal(
      bx[10:], augment.distort(two[[0, 0, 0]], augment.draw_params(rng, 3, 8)))
  # 5 copies of a class of 2 images in chunks of 3: images 0, 1, 0 | 1, 0.
  pair = x[:2]
  cx, _ = augment.balance_classes(pair, np.array([0, 0]), 7,
                                  np.random.RandomState(5), chunk_size=3)
  np.testing.assert_array_equal(
      cx[2:], augment.distort(pair[[0, 1, 0, 1, 0]], augment.draw_params(
          np.random.RandomState(5), 5, 8)))
  with pytest.raises(ValueError, match=r"classes \[1\] have none"):
    augment.balance_classes(x[y != 1], y[y != 1], 4, rng)
  with pytest.raises(ValueError, match="uint8 images"):
    augment.balance_classes(x.astype(np.float32), y, 4, rng)
  with pytest.raises(ValueError, match="uint8 images"):
    augment.balance_classes(x[:0], y[:0], 4, rng)
  with pytest.raises(ValueError, match="per_class must be an integer >= 1; "
                     "got 0"):
    augment.balance_classes(x, y, 0, rng)
  with pytest.raises(ValueError, match="per_class must be an integer >= 1; "
                     "got 2.5"):
    augment.balance_classes(x, y, 2.5, rng)
  with pytest.raises(ValueError, match="chunk_size must be an integer >= 1; "
                     "got 0"):
    augment.balance_classes(x, y, 4, rng, chunk_size=0)
  with pytest.raises(ValueError, match="integer labels; got dtype float"):
    augment.balance_classes(x, y.astype(float), 4, rng)
  with pytest.raises(ValueError, match=r"in \[0, 2\); got shape \(9,\), "
                     r"range \[0, 2\]"):
    augment.balance_classes(x, y, 4, rng, num_classes=2)


def test_augment_reproduces_a_stored_scikit_image_and_opencv_output():
  """Bit for bit: the SHA-256 of what skimage 0.26.0 `rotate`/`warp` and
  OpenCV 5.1.0 `warpAffine` gave for these images and draws (computed once
  with the original's calls, as in the next test)."""
  x = np.random.RandomState(11).randint(0, 256, (8, 32, 32, 3)).astype(
      np.uint8)
  x[4:] = np.repeat(x[4:, :, :, :1] // 2 + 64, 3, -1)   # smoother, grey
  p = augment.draw_params(np.random.RandomState(12), 8, 32)
  assert hashlib.sha256(augment.distort(x, p).tobytes()).hexdigest() == (
      "3dece381179218d4355d5f558927412b5ddf5bc8ca5baf50e5cb1c812fed1c42")


def test_augment_matches_scikit_image_and_opencv():
  """The original's own calls, where those libraries are installed."""
  transform = pytest.importorskip("skimage.transform")
  cv2 = pytest.importorskip("cv2")
  x = np.concatenate([_RNG.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
                      np.repeat(_RNG.integers(0, 256, (20, 32, 32, 1),
                                              dtype=np.uint8), 3, -1)])
  p = augment.draw_params(np.random.RandomState(1), len(x), 32)
  expected = []
  for i, image in enumerate(x):
    out = transform.rotate(image, p["angle"][i], mode="edge")
    out = cv2.warpAffine(out, np.float32([[1, 0, p["tx"][i]],
                                          [0, 1, p["ty"][i]]]), (32, 32))
    t, l, bb, bl, tt, tr, brb, brr = p["corners"][i]
    fit = transform.ProjectiveTransform()
    fit.estimate(np.array(((l, t), (bl, 32 - bb), (32 - brr, 32 - brb),
                           (32 - tr, tt))),
                 np.array(((0, 0), (0, 32), (32, 32), (32, 0))))
    out = transform.warp(out, fit, output_shape=(32, 32), order=1,
                         mode="edge")
    expected.append((out * 255.0).astype(np.uint8))
  np.testing.assert_array_equal(augment.distort(x, p), np.stack(expected))


def test_prepare_gtsrb_balances_raw_images_then_equalises(tmp_path):
  source = tmp_path / "src"
  source.mkdir()
  raw = _RNG.integers(20, 90, (5, 32, 32, 3), dtype=np.uint8)
  labels = np.array([0, 1, 1, 2, 1])
  np.savez(source / "train.npz", images=raw, labels=labels)
  np.savez(source / "test.npz", images=raw[:2], labels=labels[:2])
  counts = prepare.prepare_gtsrb(str(source), str(tmp_path / "out"),
                                 balance_per_class=4, augment_seed=9)
  assert counts == {"train": 12, "test": 2}
  written = np.load(tmp_path / "out" / "train.npz")
  bx, by = augment.balance_classes(raw, labels, 4, np.random.RandomState(9))
  np.testing.assert_array_equal(written["images"], prepare.equalize_images(bx))
  np.testing.assert_array_equal(written["labels"], by)
  with pytest.raises(ValueError, match="balance_per_class must be >= 0"):
    prepare.prepare_gtsrb(str(source), str(tmp_path / "o"),
                          balance_per_class=-1)


def test_prepare_flower17_copies_continue_the_shuffle_state(tmp_path):
  image_module = pytest.importorskip("PIL.Image")
  source = tmp_path / "jpg"
  source.mkdir()
  for number in range(1, 13):
    array = _RNG.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    image_module.fromarray(array).save(source / f"image_{number:04d}.png")
  common = ["flower17", f"--source={source}", "--images_per_class=4",
            "--num_train_per_class=3", "--image_size=8"]
  prepare.main(common + [f"--output={tmp_path / 'plain'}",
                         "--balance_per_class=0"])
  prepare.main(common + [f"--output={tmp_path / 'paper'}",
                         "--balance_per_class=5"])
  prepare.main(common + [f"--output={tmp_path / 'seeded'}",
                         "--balance_per_class=5", "--augment_seed=12312"])
  plain = np.load(tmp_path / "plain" / "train.npz")
  rng = np.random.RandomState(prepare.FLOWER17_SEED)
  rng.permutation(12)                        # the shuffle, then the copies
  for name, state in (("paper", rng), ("seeded",
                                       np.random.RandomState(12312))):
    bx, by = augment.balance_classes(plain["images"], plain["labels"], 5,
                                     state)
    written = np.load(tmp_path / name / "train.npz")
    np.testing.assert_array_equal(written["images"], bx)
    np.testing.assert_array_equal(written["labels"], by)
  test = np.load(tmp_path / "paper" / "test.npz")
  assert len(test["labels"]) == 3                  # the test split untouched


# --- Deterministic batching and sharding ------------------------------------

def _take(iterator, n):
  return [tuple(np.copy(a) for a in b) for b in itertools.islice(iterator, n)]


def test_batches_are_deterministic_and_cover_each_epoch():
  images = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 3))
  labels = np.arange(10)
  run = _take(data.batches(images, labels, batch_size=3, seed=7), 9)
  again = _take(data.batches(images, labels, batch_size=3, seed=7), 9)
  other = _take(data.batches(images, labels, batch_size=3, seed=8), 9)
  for (x, y), (x2, y2) in zip(run, again, strict=True):
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
  assert any(not np.array_equal(a[1], b[1]) for a, b in zip(run, other, strict=True))
  # 3 batches per epoch (remainder dropped), no repeats inside an epoch,
  # and each epoch is its own permutation.
  for epoch in range(3):
    seen = np.concatenate([y for _, y in run[3 * epoch:3 * epoch + 3]])
    assert len(set(seen)) == 9
    np.testing.assert_array_equal(
        seen, data.epoch_permutation(10, seed=7, epoch=epoch)[:9])
  for x, y in run:
    np.testing.assert_array_equal(x[:, 0], y)  # Pairs stay aligned.


@pytest.mark.parametrize("k", [0, 1, 4, 7])
def test_resume_equals_uninterrupted_run(k):
  images, labels = np.arange(22)[:, None], np.arange(22)
  full = _take(data.batches(images, labels, batch_size=4, seed=3), 12)
  resumed = _take(data.batches(images, labels, batch_size=4, seed=3,
                               start_step=k), 12 - k)
  for (_, y), (_, y2) in zip(full[k:], resumed, strict=True):
    np.testing.assert_array_equal(y, y2)


def test_ordered_single_pass_keeps_remainder():
  labels = np.arange(7)
  out = list(data.batches(labels, labels, batch_size=3, shuffle=False,
                          num_epochs=1, drop_remainder=False))
  assert [list(y) for _, y in out] == [[0, 1, 2], [3, 4, 5], [6]]
  x, y, mask = data.pad_batch(*out[-1], batch_size=3)
  assert list(y) == [6, 0, 0] and list(mask) == [1, 0, 0]
  assert x.shape == (3,)


def test_sharding_shapes_and_hosts():
  assert jax.local_device_count() == 4  # From tests/conftest.py.
  images = np.arange(16 * 2 * 2).reshape(16, 2, 2).astype(np.float32)
  labels = np.arange(16)
  x, y = next(data.batches(images, labels, batch_size=8, seed=0,
                           num_devices=4))
  assert x.shape == (4, 2, 2, 2) and y.shape == (4, 2)
  # Two hosts with two devices each split a global batch of 8 contiguously.
  batch = (np.arange(8), np.arange(8) * 10)
  parts = [data.shard_batch(batch, num_devices=2, process_index=i,
                            process_count=2) for i in range(2)]
  np.testing.assert_array_equal(parts[0][0], [[0, 1], [2, 3]])
  np.testing.assert_array_equal(parts[1][0], [[4, 5], [6, 7]])
  np.testing.assert_array_equal(parts[1][1], [[40, 50], [60, 70]])


def test_batching_errors():
  x = np.zeros((10, 2))
  with pytest.raises(ValueError, match="Batch size 6 .* devices 4"):
    next(data.batches(x, x, batch_size=6, seed=0, num_devices=4))
  with pytest.raises(ValueError, match="Batch size 6 .* devices 4"):
    data.shard_batch(np.zeros((6, 1)), num_devices=4)
  with pytest.raises(ValueError, match="batch_size 11 .* 10 examples"):
    next(data.batches(x, x, batch_size=11, seed=0))
  with pytest.raises(ValueError, match="differ in length: 10 vs 9"):
    next(data.batches(x, x[:9], batch_size=2, seed=0))

r"""The paper's class-balancing augmentation of GTSRB and Flower-17, in NumPy.

The original code (`GTSRB/generate_data.py`, `Flower/generate_data.py`)
fills each class of the training set up to a fixed count (GTSRB 10,000,
Flower 1,000) with distorted copies of its images: copy `i` of a class with
`count` images distorts its image `i % count`. Each copy is, in order:

1. rotated by U(-15, 15) degrees about the image centre, edge pixels
   extended (`skimage.transform.rotate(image, angle, mode="edge")`, which
   also turns uint8 into float in [0, 1]);
2. translated by `(5 U - 2.5, 5 U - 2.5)` pixels, zero outside
   (`cv2.warpAffine` with a float32 matrix, bilinear);
3. warped by the projective map that takes four corners jittered by
   U(-d, d), `d = 0.3 H U(0, 0.8)`, to the image's corners, used as the map
   from output to input coordinates, edge pixels extended
   (`skimage.transform.warp(image, transform, order=1, mode="edge")`);
4. multiplied by 255 and truncated to uint8.

Every random number is drawn in the original's order from one
`np.random.RandomState` (12 per copy), so the same state gives the same
distortions. The resampling is written here, not taken from scikit-image or
OpenCV (neither is a dependency): bilinear interpolation as skimage's
`_warp_fast`, and OpenCV's sampling positions quantised to 1/32 pixel with
its float32 weight table. See `BUILD.md`, "Data", for how closely the
output matches the two libraries.

References:
  Chen et al., "Robust Attribution Regularization", NeurIPS 2019 (spec Sec.
  5.2-5.3: GTSRB balanced to 10,000 and Flower to 1,000 images per class).
"""

import operator
from typing import Optional

import numpy as np

MAX_ANGLE = 15.0      # degrees
MAX_TRANS = 5.0       # pixels, the width of the translation's range
MAX_WARP = 0.8
DRAWS_PER_IMAGE = 12  # 1 angle + 2 shifts + d + 8 corner offsets
CHUNK_VALUES = 1 << 21  # uint8 values distorted at once by balance_classes
_CV_INTER_BITS = 5    # OpenCV: 32 sub-pixel positions
_CV_AB_BITS = 10


def draw_params(rng: np.random.RandomState, n: int, height: int) -> dict:
  """Draws the distortions of `n` copies, in the original code's order.

  Per copy: `angle = U(-15, 15)`; `tx = 5 U - 2.5`; `ty = 5 U - 2.5`;
  `d = (height * 0.3) * U(0, 0.8)`; then `U(-d, d)` for tl_top, tl_left,
  bl_bottom, bl_left, tr_top, tr_right, br_bottom, br_right. `U(a, b)` is
  `a + (b - a) * u` with one `u = rng.random_sample()` each, as
  `RandomState.uniform`.

  Args:
    rng: the state to draw from (advanced by `12 n` doubles).
    n: number of copies.
    height: image height, `H` (the original uses it for both sides).

  Returns:
    {"angle" [n], "tx" [n], "ty" [n], "d" [n], "corners" [n, 8]}, float64.

  References:
    RAR spec Sec. 5.2 (the augmentation's distributions).

  Example:
    >>> p = draw_params(np.random.RandomState(0), 2, 32)
    >>> p["corners"].shape, bool(np.all(np.abs(p["angle"]) <= 15))
    ((2, 8), True)
  """
  u = rng.random_sample((n, DRAWS_PER_IMAGE))
  uniform = lambda low, high, v: low + (high - low) * v   # as RandomState
  d = (height * 0.3) * uniform(0.0, MAX_WARP, u[:, 3])
  return {
      "angle": uniform(-MAX_ANGLE, MAX_ANGLE, u[:, 0]),
      "tx": MAX_TRANS * u[:, 1] - MAX_TRANS / 2,
      "ty": MAX_TRANS * u[:, 2] - MAX_TRANS / 2,
      "d": d,
      "corners": uniform(-d[:, None], d[:, None], u[:, 4:]),
  }


def rotation_matrix(angle: float, height: int, width: int) -> np.ndarray:
  """skimage `rotate`'s output-to-input map: about `(W/2 - 0.5, H/2 - 0.5)`.

  Args:
    angle: degrees.
    height: `H`.
    width: `W`.

  Returns:
    float64 [3, 3], acting on `(x = column, y = row, 1)`.

  References:
    scikit-image, `skimage.transform.rotate`.

  Example:
    >>> m = rotation_matrix(90.0, 4, 4)
    >>> np.round(m @ [0.0, 0.0, 1.0], 12)     # output (0, 0) reads (3, 0)
    array([3., 0., 1.])
  """
  cx, cy = width / 2.0 - 0.5, height / 2.0 - 0.5
  t = np.deg2rad(angle)
  to_centre = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], np.float64)
  rotate = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0],
                     [0, 0, 1]], np.float64)
  back = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]], np.float64)
  return back @ (rotate @ to_centre)


def projective_matrix(corners: np.ndarray, height: int) -> np.ndarray:
  """The homography taking the jittered corners to the image's corners.

  `corners` = (tl_top, tl_left, bl_bottom, bl_left, tr_top, tr_right,
  br_bottom, br_right) as drawn; the points are `(tl_left, tl_top)`,
  `(bl_left, H - bl_bottom)`, `(H - br_right, H - br_bottom)`,
  `(H - tr_right, tr_top)`, mapped to `(0, 0)`, `(0, H)`, `(H, H)`, `(H, 0)`
  (the original uses the height for both sides). Fitted as
  `ProjectiveTransform.estimate` does: the direct linear transform on points
  centred and scaled to unit RMS coordinate (Hartley's normalisation),
  solved by SVD, so that the matrix, and with it the resampled pixels, come
  out the same to the last bit (checked against scikit-image 0.26; a plain
  solve of the 8 equations differs by ~1e-15, enough to move 0.5 % of the
  truncated uint8 values by one level).

  Args:
    corners: float [8].
    height: `H`.

  Returns:
    float64 [3, 3], acting on `(x, y, 1)`, with `[2, 2] = 1`.

  References:
    scikit-image, `ProjectiveTransform.estimate`; Hartley, "In defense of
    the eight-point algorithm", TPAMI 1997; RAR spec Sec. 5.2.

  Example:
    >>> m = projective_matrix(np.zeros(8), 32)                 # no jitter
    >>> bool(np.allclose(m, np.eye(3), atol=1e-12))
    True
  """
  tl_top, tl_left, bl_bottom, bl_left, tr_top, tr_right, br_bottom, br_right = (
      float(v) for v in corners)
  h = float(height)
  src = np.array([(tl_left, tl_top), (bl_left, h - bl_bottom),
                  (h - br_right, h - br_bottom), (h - tr_right, tr_top)])
  dst = np.array([(0.0, 0.0), (0.0, h), (h, h), (h, 0.0)])
  t_src, src = _normalised(src)
  t_dst, dst = _normalised(dst)
  # Rows for u = (a.x) / (c.x) and v = (b.x) / (c.x), x = (x, y, 1):
  # [x, y, 1, 0, 0, 0, -u x, -u y, -u] and [0, 0, 0, x, y, 1, -v x, ...].
  n = len(src)
  a = np.zeros((2 * n, 9))
  for k in range(2):
    rows = slice(k * n, (k + 1) * n)
    a[rows, 3 * k:3 * k + 2] = src
    a[rows, 3 * k + 2] = 1
    a[rows, 6:8] = src
    a[rows, 8] = -1
    a[rows, 6:] *= -dst[:, k:k + 1]
  v = np.linalg.svd(a)[2][-1]
  m = np.zeros((3, 3))
  m.flat[:8] = -v[:-1] / v[-1]
  m[2, 2] = 1
  m = np.linalg.inv(t_dst) @ m @ t_src
  return m / m[-1, -1]


def _normalised(points):
  """(T, T(points)): centred at the centroid, RMS coordinate 1."""
  centroid = np.mean(points, axis=0)
  scale = np.sqrt(np.mean((points - centroid) ** 2))
  t = np.eye(3)
  t[:2, 2] = -centroid
  t[:2, :] /= scale
  moved = np.hstack((points, np.ones((len(points), 1)))) @ t.T
  return t, moved[:, :2] / moved[:, 2:]


def _grid(height, width):
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
  return xs, ys


def warp_edge(images: np.ndarray, matrices: np.ndarray) -> np.ndarray:
  """skimage `warp(image, matrix, order=1, mode="edge", clip=True)`, batched.

  Output pixel `(x, y)` reads the input at `M (x, y, 1)` (divided by its
  third coordinate unless M is affine), bilinear, with each neighbour's
  index clamped to the image (edge extension), then clipped to the input
  image's range.

  Args:
    images: float64 [B, H, W, C].
    matrices: float64 [B, 3, 3].

  Returns:
    float64 [B, H, W, C].

  References:
    scikit-image, `skimage.transform.warp` (`_warp_fast`, bilinear, "E").

  Example:
    >>> x = np.arange(4.0).reshape(1, 2, 2, 1)
    >>> shift = np.array([[[1.0, 0, 0.5], [0, 1, 0], [0, 0, 1]]])
    >>> warp_edge(x, shift)[0, :, :, 0]     # half a pixel left, edge kept
    array([[0.5, 1. ],
           [2.5, 3. ]])
  """
  b, height, width, _ = images.shape
  x, y = _grid(height, width)
  m = matrices[:, :, :, None, None]
  xs = m[:, 0, 0] * x + m[:, 0, 1] * y + m[:, 0, 2]
  ys = m[:, 1, 0] * x + m[:, 1, 1] * y + m[:, 1, 2]
  affine = np.all(matrices[:, 2] == [0.0, 0.0, 1.0], axis=1)
  if not np.all(affine):
    zs = m[:, 2, 0] * x + m[:, 2, 1] * y + m[:, 2, 2]
    xs = np.where(affine[:, None, None], xs, xs / zs)
    ys = np.where(affine[:, None, None], ys, ys / zs)
  r0, c0 = np.floor(ys), np.floor(xs)
  dr, dc = (ys - r0)[..., None], (xs - c0)[..., None]
  clamp = lambda v, n: np.clip(v, 0, n - 1).astype(np.intp)
  rows = (clamp(r0, height), clamp(r0 + 1, height))
  cols = (clamp(c0, width), clamp(c0 + 1, width))
  batch = np.arange(b)[:, None, None]
  pix = lambda r, c: images[batch, r, c]
  top = (1 - dc) * pix(rows[0], cols[0]) + dc * pix(rows[0], cols[1])
  bottom = (1 - dc) * pix(rows[1], cols[0]) + dc * pix(rows[1], cols[1])
  out = (1 - dr) * top + dr * bottom
  lo = images.min(axis=(1, 2, 3), keepdims=True)
  hi = images.max(axis=(1, 2, 3), keepdims=True)
  return np.clip(out, lo, hi)


def translate_zero(images: np.ndarray, tx: np.ndarray,
                   ty: np.ndarray) -> np.ndarray:
  """`cv2.warpAffine(image, float32 [[1, 0, tx], [0, 1, ty]], (W, H))`.

  Output `(x, y)` reads the input at `(x - tx, y - ty)`, the position
  rounded as OpenCV does (1/1024, then 1/32 pixel), bilinear with OpenCV's
  float32 weights, and 0 for neighbours outside the image.

  Args:
    images: float64 [B, H, W, C].
    tx: [B] shifts to the right (pixels), used as float32.
    ty: [B] shifts down.

  Returns:
    float64 [B, H, W, C].

  References:
    OpenCV, `cv2.warpAffine` (INTER_LINEAR, BORDER_CONSTANT).

  Example:
    >>> x = np.arange(4.0).reshape(1, 2, 2, 1)
    >>> translate_zero(x, np.array([1.0]), np.array([0.0]))[0, :, :, 0]
    array([[0., 0.],
           [0., 2.]])
  """
  b, height, width, _ = images.shape
  scale = 1 << _CV_AB_BITS
  shift = _CV_AB_BITS - _CV_INTER_BITS
  half = scale >> (_CV_INTER_BITS + 1)
  tab = 1 << _CV_INTER_BITS

  def fixed(offset, n):
    # The inverse map's offset (-t, from a float32 t) in 1/1024 pixels,
    # rounded half to even like cvRound, plus the pixel index.
    t = -np.asarray(offset, np.float32).astype(np.float64)
    base = np.rint(t * scale).astype(np.int64)[:, None]
    pos = (base + np.arange(n, dtype=np.int64) * scale + half) >> shift
    return pos >> _CV_INTER_BITS, pos & (tab - 1)

  ix, fx = fixed(tx, width)    # [B, W]
  iy, fy = fixed(ty, height)   # [B, H]
  wx1 = (fx / np.float32(tab)).astype(np.float32)
  wy1 = (fy / np.float32(tab)).astype(np.float32)
  wx0, wy0 = np.float32(1) - wx1, np.float32(1) - wy1
  batch = np.arange(b)[:, None, None]

  def pix(r, c):
    valid = ((r >= 0) & (r < height))[:, :, None] & (
        (c >= 0) & (c < width))[:, None, :]
    rr = np.clip(r, 0, height - 1)[:, :, None]
    cc = np.clip(c, 0, width - 1)[:, None, :]
    return np.where(valid[..., None], images[batch, rr, cc], 0.0)

  w = lambda wy, wx: (wy[:, :, None] * wx[:, None, :]).astype(
      np.float64)[..., None]
  out = pix(iy, ix) * w(wy0, wx0) + pix(iy, ix + 1) * w(wy0, wx1)
  out = out + pix(iy + 1, ix) * w(wy1, wx0)
  return out + pix(iy + 1, ix + 1) * w(wy1, wx1)


def distort(images: np.ndarray, params: dict) -> np.ndarray:
  """Rotates, translates and warps uint8 images as the original code.

  Args:
    images: uint8 [B, H, W, C].
    params: `draw_params(rng, B, H)`.

  Returns:
    uint8 [B, H, W, C]: `(warped * 255)` truncated, as `astype(np.uint8)`.

  References:
    RAR spec Sec. 5.2 (`transform_image` of the original code).

  Example:
    >>> x = np.random.RandomState(1).randint(0, 256, (2, 8, 8, 3)).astype(
    ...     np.uint8)
    >>> y = distort(x, draw_params(np.random.RandomState(0), 2, 8))
    >>> y.shape, y.dtype
    ((2, 8, 8, 3), dtype('uint8'))
  """
  _, height, width, _ = images.shape
  x = images * (1.0 / 255.0)   # skimage's img_as_float, bit for bit
  x = warp_edge(x, np.stack([rotation_matrix(a, height, width)
                             for a in params["angle"]]))
  x = translate_zero(x, params["tx"], params["ty"])
  x = warp_edge(x, np.stack([projective_matrix(c, height)
                             for c in params["corners"]]))
  return (x * 255.0).astype(np.uint8)


def balance_classes(images: np.ndarray, labels: np.ndarray,
                    per_class: int, rng: np.random.RandomState, *,
                    num_classes: Optional[int] = None,
                    chunk_size: Optional[int] = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Fills every class up to `per_class` images with distorted copies.

  As the original: class by class (0, 1, ...), its images in their order,
  then `per_class - count` copies, copy `i` distorting image `i % count`,
  drawn from `rng` in that order. A class with more than `per_class` images
  keeps them all and gets no copies (the original failed there).

  Args:
    images: uint8 [N, H, W, C], N >= 1.
    labels: integer [N] in `[0, num_classes)`.
    per_class: the count to fill each class up to (paper: GTSRB 10,000,
      Flower 1,000).
    rng: the random state (advanced by 12 draws per copy).
    num_classes: classes to fill (default `max(labels) + 1`); every one
      needs at least one image.
    chunk_size: copies distorted at once (default: `CHUNK_VALUES` pixel
      values' worth, which bounds the float64 temporaries to ~200 MB).

  Returns:
    `(images uint8 [M, H, W, C], labels int32 [M])`, grouped by class.

  Raises:
    ValueError: not uint8 [N, H, W, C] with N >= 1, labels not integers [N]
      in `[0, num_classes)`, `per_class` or `chunk_size` not an integer >= 1,
      or a class with no image to copy.

  References:
    RAR spec Sec. 5.2-5.3 (`augment_and_balance_data` of the original).

  Example:
    >>> x = np.zeros((3, 4, 4, 3), np.uint8)
    >>> bx, by = balance_classes(x, np.array([1, 0, 1]), 4,
    ...                          np.random.RandomState(0))
    >>> bx.shape, by.tolist()
    ((8, 4, 4, 3), [0, 0, 0, 0, 1, 1, 1, 1])
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if images.dtype != np.uint8 or images.ndim != 4 or not len(images):
    raise ValueError("balance_classes needs uint8 images [N, H, W, C] with "
                     f"N >= 1; got {images.dtype} {images.shape}.")
  per_class = _positive_int("per_class", per_class)
  if chunk_size is None:
    chunk_size = max(1, CHUNK_VALUES // int(np.prod(images.shape[1:])))
  chunk_size = _positive_int("chunk_size", chunk_size)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"balance_classes needs integer labels; got dtype "
                     f"{labels.dtype}.")
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  if labels.shape != images.shape[:1] or labels.min() < 0 or (
      labels.max() >= num_classes):
    raise ValueError(
        f"balance_classes needs labels [N] = [{len(images)}] in [0, "
        f"{num_classes}); got shape {labels.shape}, range "
        f"[{labels.min()}, {labels.max()}].")
  counts = np.bincount(labels, minlength=num_classes)
  if np.any(counts == 0):
    raise ValueError(
        "balance_classes needs at least one image of every class to copy; "
        f"classes {np.flatnonzero(counts == 0).tolist()} have none.")
  sizes = np.maximum(counts, per_class)
  out_x = np.empty((int(sizes.sum()),) + images.shape[1:], np.uint8)
  out_y = np.repeat(np.arange(num_classes, dtype=np.int32), sizes)
  at = 0
  for c in range(num_classes):
    originals = images[labels == c]
    out_x[at:at + len(originals)] = originals
    at += len(originals)
    missing = per_class - len(originals)
    for start in range(0, max(missing, 0), chunk_size):
      n = min(chunk_size, missing - start)
      source = originals[(start + np.arange(n)) % len(originals)]
      out_x[at:at + n] = distort(source, draw_params(rng, n, images.shape[1]))
      at += n
  return out_x, out_y


def _positive_int(name, value):
  try:
    number = operator.index(value)
  except TypeError:
    number = 0
  if number < 1:
    raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
  return number


__all__ = ["MAX_ANGLE", "MAX_TRANS", "MAX_WARP", "DRAWS_PER_IMAGE", "CHUNK_VALUES",
           "draw_params", "rotation_matrix", "projective_matrix", "warp_edge",
           "translate_zero", "distort", "balance_classes"]

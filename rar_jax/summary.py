"""A TensorFlow-free TensorBoard scalar writer.

`tensorboard --logdir WORKDIR` reads the event files it writes. TensorBoard
event files are TFRecord files of `Event` protocol buffers; the few fields a
scalar needs are encoded here by hand, so neither TensorFlow nor the protobuf
definitions are needed.

Example:
  >>> import tempfile
  >>> with SummaryWriter(tempfile.mkdtemp()) as writer:
  ...   writer.scalar("train/loss", 0.25, step=10)

References:
  TensorFlow, "TFRecord and tf.train.Example" (the record framing);
  TensorBoard's `tensorboard/compat/proto/event.proto` and `summary.proto`
  (the `Event` and `Summary` messages).
"""

import os
import socket
import struct
import time

_CRC32C_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC32C_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord framing uses.

  Args:
    data: the bytes to check.

  Returns:
    The 32-bit checksum, an int in `[0, 2**32)`.

  References:
    Castagnoli, Braeuer, Herrmann, "Optimization of Cyclic Redundancy-Check
    Codes with 24 and 32 Parity Bits", IEEE Trans. Commun. 1993.

  Example:
    >>> hex(crc32c(b"123456789"))                 # the standard check value
    '0xe3069283'
  """
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  value &= (1 << 64) - 1
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  return _varint((number << 3) | wire_type) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


def encode_event(*, wall_time: float, step: int = 0, file_version=None,
                 scalars=(), session_start=False) -> bytes:
  """Serialises an `Event`: a file version, scalar summaries or a restart.

  Args:
    wall_time: seconds since the epoch.
    step: the global step.
    file_version: e.g. `"brain.Event:2"` for a file's first event, or None.
    scalars: `(tag, value)` pairs of one step.
    session_start: a `SessionLog` START (a restart at `step`).

  Returns:
    The protocol-buffer bytes of the `Event`.

  References:
    TensorBoard, `tensorboard/compat/proto/event.proto` (`Event`) and
    `summary.proto` (`Summary.Value.simple_value`), `SessionLog`.

  Example:
    >>> encode_event(wall_time=1.0, step=2).hex()   # fields 1 and 2
    '09000000000000f03f1002'
  """
  out = _field(1, 1, struct.pack("<d", wall_time))     # double wall_time = 1
  out += _field(2, 0, _varint(int(step)))               # int64 step = 2
  if file_version is not None:                          # string file_version = 3
    out += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode())   # Value.tag = 1
                     + _field(2, 5, struct.pack("<f", float(value))))
        for tag, value in scalars)                      # Value.simple_value = 2
    out += _bytes_field(5, values)                      # Summary summary = 5
  if session_start:                                     # SessionLog session_log = 7
    out += _bytes_field(7, _field(1, 0, _varint(1)))    # status = START (1)
  return out


def tfrecord(data: bytes) -> bytes:
  """Frames one record: length, masked CRC of length, data, masked CRC.

  Args:
    data: the record's bytes (a serialised `Event`).

  Returns:
    `len(data) + 16` bytes: uint64 length, uint32 masked CRC-32C of the
    length, the data, uint32 masked CRC-32C of the data (little-endian).

  References:
    TensorFlow, "TFRecord and tf.train.Example" (the TFRecord format).

  Example:
    >>> len(tfrecord(b"abc"))
    19
  """
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", _masked_crc(length)) + data
          + struct.pack("<I", _masked_crc(data)))


def read_records(path):
  """Yields the records of a TFRecord file, checking both CRCs.

  Args:
    path: a TFRecord file (e.g. an event file of `SummaryWriter`).

  Yields:
    The data of each record, as bytes.

  Raises:
    ValueError: a record whose length or data fails its CRC.

  References:
    TensorFlow, "TFRecord and tf.train.Example" (the TFRecord format).

  Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "records")
    >>> with open(path, "wb") as f:
    ...   _ = f.write(tfrecord(b"one") + tfrecord(b"two"))
    >>> list(read_records(path))
    [b'one', b'two']
  """
  with open(path, "rb") as f:
    while header := f.read(12):
      length, length_crc = struct.unpack("<QI", header)
      if _masked_crc(header[:8]) != length_crc:
        raise ValueError(f"Corrupt record length in {path}.")
      data = f.read(length)
      (data_crc,) = struct.unpack("<I", f.read(4))
      if _masked_crc(data) != data_crc:
        raise ValueError(f"Corrupt record data in {path}.")
      yield data


class SummaryWriter:
  """Appends scalar summaries to a new event file in `logdir`.

  Each writer creates its own file, `logdir/events.out.tfevents.*`, whose
  first record holds the file version; `tensorboard --logdir` reads it.

  Args:
    logdir: the folder (created if missing).

  References:
    TensorBoard, `tensorboard/compat/proto/event.proto`; TensorFlow,
    "TFRecord and tf.train.Example".

  Example:
    >>> import tempfile
    >>> with SummaryWriter(tempfile.mkdtemp()) as writer:
    ...   writer.scalars({"train/loss": 0.25, "train/accuracy": 0.9}, step=1)
    >>> len(list(read_records(writer.path)))        # version + one step
    2
  """

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    # A new file per writer (TensorBoard reads them all, in name order).
    now = time.time_ns()
    name = (f"events.out.tfevents.{now // 10**9}.{socket.gethostname()}."
            f"{os.getpid()}.{now % 10**9}")
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "xb")
    self._file.write(tfrecord(encode_event(wall_time=time.time(),
                                           file_version="brain.Event:2")))
    self._file.flush()

  def scalars(self, values: dict, step: int):
    """Writes several `{tag: value}` scalars (floats) for one step."""
    self._file.write(tfrecord(encode_event(
        wall_time=time.time(), step=step, scalars=sorted(values.items()))))

  def session_start(self, step: int):
    """Marks a restart at `step`: TensorBoard drops earlier points >= step.

    A run resumed from a checkpoint at step S calls this with S + 1, so the
    points an interrupted run logged after its last checkpoint (and that the
    resumed run logs again) are shown once.
    """
    self._file.write(tfrecord(encode_event(
        wall_time=time.time(), step=step, session_start=True)))

  def scalar(self, tag: str, value: float, step: int):
    """Writes one scalar for one step."""
    self.scalars({tag: value}, step)

  def flush(self):
    """Writes buffered records to the file."""
    self._file.flush()

  def close(self):
    """Closes the file (again: no effect)."""
    if not self._file.closed:
      self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

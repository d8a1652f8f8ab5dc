"""Tests of rar_jax.summary: TFRecord framing and Event encoding."""

import os
import struct

import pytest

from rar_jax import summary


def test_crc32c_known_vector():
  # RFC 3720 / the standard CRC-32C check value.
  assert summary.crc32c(b"123456789") == 0xE3069283
  assert summary.crc32c(b"") == 0


def _parse_varint(buf, i):
  value = shift = 0
  while True:
    b = buf[i]
    value |= (b & 0x7F) << shift
    i += 1
    if not b & 0x80:
      return value, i
    shift += 7


def _parse(buf):
  """A minimal protobuf decoder: {field: [values]}."""
  fields, i = {}, 0
  while i < len(buf):
    tag, i = _parse_varint(buf, i)
    number, wire = tag >> 3, tag & 7
    if wire == 0:
      value, i = _parse_varint(buf, i)
    elif wire == 1:
      value, i = struct.unpack("<d", buf[i:i + 8])[0], i + 8
    elif wire == 5:
      value, i = struct.unpack("<f", buf[i:i + 4])[0], i + 4
    else:
      length, i = _parse_varint(buf, i)
      value, i = buf[i:i + length], i + length
    fields.setdefault(number, []).append(value)
  return fields


def test_writer_round_trip(tmp_path):
  with summary.SummaryWriter(str(tmp_path)) as writer:
    writer.scalars({"train/loss": 0.5, "eval/acc": 0.25}, step=300)
  (name,) = os.listdir(tmp_path)
  assert name.startswith("events.out.tfevents.")
  records = list(summary.read_records(tmp_path / name))
  assert len(records) == 2
  assert _parse(records[0])[3] == [b"brain.Event:2"]
  event = _parse(records[1])
  assert event[2] == [300]
  values = [_parse(v) for v in _parse(event[5][0])[1]]
  assert {v[1][0]: v[2][0] for v in values} == {b"eval/acc": 0.25,
                                                b"train/loss": 0.5}


def test_corrupt_record_is_detected(tmp_path):
  path = tmp_path / "events.out.tfevents.x"
  data = bytearray(summary.tfrecord(b"hello"))
  data[13] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="Corrupt record data"):
    list(summary.read_records(path))


def test_session_start_is_a_session_log_start_event(tmp_path):
  # Event.session_log = 7, SessionLog.status = 1, START = 1: TensorBoard then
  # drops the points of earlier files at steps >= 21.
  with summary.SummaryWriter(str(tmp_path)) as writer:
    writer.session_start(21)
  (name,) = os.listdir(tmp_path)
  event = _parse(list(summary.read_records(tmp_path / name))[1])
  assert event[2] == [21]
  assert _parse(event[7][0]) == {1: [1]}
  assert 5 not in event and 3 not in event

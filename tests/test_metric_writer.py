"""MetricWriter: JSON lines round trip, resume, TensorBoard events, disabled processes, crashes."""

import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from mmjax.runtime.metric_writer import MetricWriter, read_metrics


def _crc32c(data: bytes) -> int:
    # Bitwise CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), independent of tensorboardX.
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path):
    """TFRecord framing: u64 length, u32 masked crc(length), payload, u32 masked crc(payload)."""
    data = path.read_bytes()
    events, offset = [], 0
    while offset < len(data):
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        assert header_crc == _masked_crc(header)
        payload = data[offset + 12 : offset + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
        assert payload_crc == _masked_crc(payload)
        event = event_pb2.Event()
        event.ParseFromString(payload)
        events.append(event)
        offset += 16 + length
    return events


def _scalars(workdir):
    scalars = []
    for path in sorted((workdir / "tensorboard").iterdir()):
        for event in _read_events(path):
            for value in event.summary.value:
                scalars.append((event.step, value.tag, value.simple_value))
    return scalars


def test_crc32c_known_vector():
    assert _crc32c(b"123456789") == 0xE3069283


def test_lines_round_trip(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(1, {"loss": 2.5, "lr": np.float32(0.125), "tokens": jnp.int32(7)})
        writer.write(2, {"loss": jnp.asarray(1.25, jnp.bfloat16), "accuracy": np.array([0.5])})
    assert read_metrics(tmp_path) == [
        {"step": 1, "loss": 2.5, "lr": 0.125, "tokens": 7.0},
        {"step": 2, "loss": 1.25, "accuracy": 0.5},
    ]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "loss": 2.5, "lr": 0.125, "tokens": 7.0}
    assert all(type(v) in (int, float) for v in json.loads(lines[0]).values())


def test_each_line_is_on_disk_before_close(tmp_path):
    writer = MetricWriter(tmp_path)
    writer.write(3, {"loss": 1.0})
    # Another reader (or the file after a crash) sees the line without close().
    assert read_metrics(tmp_path) == [{"step": 3, "loss": 1.0}]
    assert (3, "loss", 1.0) in _scalars(tmp_path)
    writer.close()


def test_non_finite_values_are_strict_json_and_round_trip(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(1, {"a": math.nan, "b": math.inf, "c": -np.inf, "d": 1.0})
    line = (tmp_path / "metrics.jsonl").read_text()
    strict = json.loads(line, parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))
    assert strict == {"step": 1, "a": "NaN", "b": "Infinity", "c": "-Infinity", "d": 1.0}
    (record,) = read_metrics(tmp_path)
    assert math.isnan(record["a"]) and record["b"] == math.inf and record["c"] == -math.inf


def test_resume_appends_after_earlier_lines(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(1, {"loss": 3.0})
        writer.write(2, {"loss": 2.0})
    with MetricWriter(tmp_path) as writer:
        writer.write(3, {"loss": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    # Each run adds its own event file; TensorBoard merges a directory's files.
    assert sorted(s for s in _scalars(tmp_path) if s[1] == "loss") == [
        (1, "loss", 3.0),
        (2, "loss", 2.0),
        (3, "loss", 1.0),
    ]


def test_event_file_holds_the_scalars(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(10, {"train/loss": 0.75, "eval/i2t_r1": 0.5})
        writer.write(20, {"train/loss": 0.25})
    files = list((tmp_path / "tensorboard").iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents.")
    first = _read_events(files[0])[0]
    assert first.file_version.startswith("brain.Event:")
    assert _scalars(tmp_path) == [
        (10, "train/loss", 0.75),
        (10, "eval/i2t_r1", 0.5),
        (20, "train/loss", 0.25),
    ]


def test_disabled_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with MetricWriter(workdir, enabled=False) as writer:
        writer.write(1, {"loss": 1.0})
    assert not workdir.exists()


def test_truncated_last_line_is_skipped_with_warning(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(1, {"loss": 3.0})
        writer.write(2, {"loss": 2.0})
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(path.read_bytes() + b'{"step": 3, "lo')  # a crash mid-write
    with pytest.warns(UserWarning, match="skipped 1 truncated last line"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]

    # Resuming drops the fragment instead of gluing the next record onto it.
    with pytest.warns(UserWarning, match="dropping a truncated last line"):
        writer = MetricWriter(tmp_path)
    writer.write(3, {"loss": 1.0})
    writer.close()
    assert read_metrics(tmp_path) == [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.0},
        {"step": 3, "loss": 1.0},
    ]


def test_complete_last_line_missing_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    with MetricWriter(tmp_path) as writer:
        writer.write(3, {"loss": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_corrupt_middle_line_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        read_metrics(tmp_path)


def test_bad_input_is_rejected(tmp_path):
    with MetricWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="metric 'loss' must be a real scalar"):
            writer.write(1, {"loss": np.ones(3)})
        with pytest.raises(ValueError, match="metric 'name' must be a real scalar"):
            writer.write(1, {"name": "abc"})
        with pytest.raises(ValueError, match="key named 'step'"):
            writer.write(1, {"step": 1.0})
        with pytest.raises(TypeError):
            writer.write(1.5, {"loss": 1.0})
    with pytest.raises(ValueError, match="is closed"):
        writer.write(2, {"loss": 1.0})
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        read_metrics(tmp_path / "missing")


def test_resume_drops_records_past_the_checkpoint(tmp_path):
    # A run logged steps 1..6, was killed, and resumes from its step-4 checkpoint: steps 5
    # and 6 will be logged again, so the earlier copies must go (one record per step).
    with MetricWriter(tmp_path) as writer:
        for step in range(1, 7):
            writer.write(step, {"loss": float(step)})
    with MetricWriter(tmp_path, resume_step=4) as writer:
        writer.write(5, {"loss": 50.0})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[-1]["loss"] == 50.0

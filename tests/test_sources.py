"""Data sources: CSV/TSV, WebDataset shards, ArrayRecord, spec parsing, conversion."""

from __future__ import annotations

import concurrent.futures
import io
import os
import pickle
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmjax.data import sources, wds_source
from mmjax.data.arrayrecord_source import (
    ArrayRecordSource,
    decode_caption_only,
    decode_record,
    encode_record,
    write_arrayrecord_shards,
)
from mmjax.data.csv_source import CsvSource
from mmjax.data.image_corpus import write_image_corpus, write_wds_shards
from mmjax.data.records import BadSample
from mmjax.data.shapes import ShapesSource
from mmjax.data.sources import caption_sample, make_source, parse_mixture, parse_spec
from mmjax.data.wds_source import WebDatasetSource, expand_braces
from mmjax.tools import data as convert

# Sources never decode, so most fixtures use distinct byte strings as "images".
CAPTIONS = [
    "a red circle",
    'quotes "inside", and a comma',
    "ünïcödé ✓",
    "tab\tinside",
    "",
    "  spaced  ",
    "line\nbreak",
]


def _image_bytes(i: int) -> bytes:
    return f"image-{i}-".encode() * (i + 1)


def _write_table(path, rows, *, header=("filepath", "caption"), delimiter=","):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _records(source):
    return [source[i] for i in range(len(source))]


def _caption_bytes(caption):
    return caption.encode("utf-8", "surrogateescape") if isinstance(caption, str) else caption


def _write_tar(path, members):
    """A tar in Python's default format (PAX: long names use extended headers)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _data_config(**overrides):
    data = ml_collections.ConfigDict(
        {"seed": 0, "train_examples": 9, "eval_examples": 5, "image_key": "filepath"}
    )
    data.update(overrides)
    return data


# --- CSV / TSV ---------------------------------------------------------------------------


@pytest.mark.parametrize("extension, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_rows_read_file_bytes_and_captions(tmp_path, monkeypatch, extension, delimiter):
    (tmp_path / "data" / "img").mkdir(parents=True)
    absolute = tmp_path / "elsewhere.bin"
    absolute.write_bytes(_image_bytes(99))
    rows = []
    for i, caption in enumerate(CAPTIONS):
        (tmp_path / "data" / "img" / f"{i}.bin").write_bytes(_image_bytes(i))
        rows.append((f"img/{i}.bin", caption))
    rows.append((str(absolute), "absolute path"))
    table = _write_table(tmp_path / "data" / f"list{extension}", rows, delimiter=delimiter)
    # Relative paths resolve against the table's folder, not the working directory.
    monkeypatch.chdir(tmp_path)

    source = CsvSource(table)
    assert source.name == f"csv:{table}"
    assert len(source) == len(rows)
    for i, record in enumerate(_records(source)):
        expected_image = _image_bytes(i) if i < len(CAPTIONS) else _image_bytes(99)
        assert record == {"key": rows[i][0], "image": expected_image, "caption": rows[i][1]}
        assert source.caption(i) == rows[i][1]
    with pytest.raises(IndexError, match="index 8"):
        source[len(rows)]


def test_csv_custom_columns_and_tsv_is_not_split_on_commas(tmp_path):
    (tmp_path / "a,b.bin").write_bytes(b"xyz")
    table = _write_table(
        tmp_path / "t.tsv", [("A caption, with comma", "a,b.bin", "extra")],
        header=("text", "url", "other"), delimiter="\t",
    )  # fmt: skip
    source = CsvSource(table, image_key="url", caption_key="text")
    assert source[0] == {"key": "a,b.bin", "image": b"xyz", "caption": "A caption, with comma"}


def test_csv_missing_column_names_it_the_file_and_the_columns(tmp_path):
    table = _write_table(tmp_path / "t.csv", [("a.jpg", "x")], header=("path", "caption"))
    with pytest.raises(ValueError, match=r"t\.csv.*'filepath'.*\['path', 'caption'\]"):
        CsvSource(table)
    with pytest.raises(ValueError, match="'text'"):
        CsvSource(table, image_key="path", caption_key="text")


def test_csv_without_rows_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv"):
        CsvSource(tmp_path / "empty.csv")
    header_only = _write_table(tmp_path / "header.csv", [])
    with pytest.raises(ValueError, match=r"header\.csv.*no rows"):
        CsvSource(header_only)


def test_csv_unreadable_image_is_a_missing_file_bad_sample(tmp_path):
    (tmp_path / "folder").mkdir()
    table = _write_table(tmp_path / "t.csv", [("gone.jpg", "a"), ("folder", "b"), ("", "c")])
    source = CsvSource(table)
    for i in range(3):
        with pytest.raises(BadSample) as bad:
            source[i]
        assert bad.value.reason == "missing_file"
    with pytest.raises(BadSample, match=r"missing_file: .*gone\.jpg"):
        source[0]
    assert source.caption(0) == "a"  # Captions stay readable without the image.


def test_non_utf8_caption_is_detectable_and_round_trips_as_the_original_bytes(tmp_path):
    (tmp_path / "0.bin").write_bytes(b"zero")
    (tmp_path / "1.bin").write_bytes(b"one")
    (tmp_path / "t.csv").write_bytes(b"filepath,caption\n0.bin,caf\xe9 latin-1\n1.bin,fine\n")
    source = CsvSource(tmp_path / "t.csv")
    caption = source.caption(0)
    assert isinstance(caption, str) and "\udce9" in caption
    with pytest.raises(UnicodeEncodeError):
        caption.encode("utf-8")  # What a strict decoder sees: not UTF-8.
    assert caption_sample(source) == ["fine"]

    counts = write_arrayrecord_shards(source, tmp_path / "ar", 1, progress=False)
    assert counts == {"written": 2, "skipped_missing_file": 0}
    stored = ArrayRecordSource(str(tmp_path / "ar" / "*.array_record"))
    assert stored[0]["caption"] == b"caf\xe9 latin-1"
    assert stored.caption(1) == b"fine"


# --- WebDataset --------------------------------------------------------------------------


def test_expand_braces():
    assert expand_braces("s/{000000..000002}.tar") == [
        "s/000000.tar", "s/000001.tar", "s/000002.tar"
    ]  # fmt: skip
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert expand_braces("{08..11}") == ["08", "09", "10", "11"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("{a,b}-{0..1}.tar") == ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
    assert expand_braces("x{,_old}") == ["x", "x_old"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("{x}.tar") == ["{x}.tar"]


def _sample_shards(folder):
    """Three shards, 8 samples: mixed image extensions, a long (PAX) name, ignored members."""
    folder.mkdir(exist_ok=True)
    long_prefix = "d" * 60 + "/" + "e" * 70
    layout = [
        [("000.jpg", 0), ("001.JPG", 1), ("002.png", 2)],
        [(f"{long_prefix}/003.webp", 3), ("004.jpeg", 4)],
        [("005.PNG", 5), ("006.jpg", 6), ("007.jpg", 7)],
    ]
    expected = []
    for shard, samples in enumerate(layout):
        members = [("README", b"not a sample"), ("000.cls", b"ignored")]
        for name, i in samples:
            key = name.split(".")[0]
            members += [
                (name, _image_bytes(i)),
                (f"{key}.txt", f"caption {i} ✓".encode()),
                (f"{key}.json", b"{}"),
            ]
            expected.append((key, _image_bytes(i), f"caption {i} ✓".encode()))
        _write_tar(folder / f"{shard:06d}.tar", members)
    return str(folder / "{000000..000002}.tar"), expected


def test_wds_reads_members_in_order_across_shards_without_extracting(tmp_path):
    pattern, expected = _sample_shards(tmp_path / "shards")
    source = WebDatasetSource(pattern)
    assert source.name == f"wds:{pattern}"
    assert len(source) == len(expected)
    records = _records(source)
    assert [(r["key"].rsplit(":", 1)[1], r["image"], r["caption"]) for r in records] == expected
    assert records[0]["key"] == f"{tmp_path}/shards/000000.tar:000"
    assert [source.caption(i) for i in range(len(source))] == [e[2] for e in expected]
    # Only the shards and their indexes: nothing was extracted.
    assert sorted(os.listdir(tmp_path / "shards")) == sorted(
        [f"{s:06d}.tar" for s in range(3)] + [f"{s:06d}.tar.idx.json" for s in range(3)]
    )
    # Threads share descriptors safely (pread has no file position).
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda i: source[i], list(range(len(source))) * 3))
    assert again == records * 3


def _forbid_scanning(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("tar headers scanned although a fresh index was cached")

    monkeypatch.setattr(wds_source.tarfile, "open", fail)


def test_wds_index_is_cached_next_to_the_shard_reused_and_rebuilt_when_stale(tmp_path, monkeypatch):
    pattern, expected = _sample_shards(tmp_path)
    first = _records(WebDatasetSource(pattern))
    with monkeypatch.context() as patch:
        _forbid_scanning(patch)
        assert _records(WebDatasetSource(pattern)) == first

    # A changed shard (size and mtime) invalidates its index.
    _write_tar(tmp_path / "000001.tar", [("new.jpg", b"new image"), ("new.txt", b"new caption")])
    source = WebDatasetSource(pattern)
    assert len(source) == len(expected) - 1
    assert source[3]["image"] == b"new image" and source.caption(3) == b"new caption"
    # Either a new size or a new mtime alone marks the index stale.
    shard = tmp_path / "000001.tar"
    stat = shard.stat()
    _write_tar(shard, [("sz.jpg", b"bigger image" * 3000), ("sz.txt", b"size")])
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert WebDatasetSource(pattern).caption(3) == b"size"
    stat = shard.stat()
    # Same tar size (padded to 10 KiB records), members at other offsets.
    _write_tar(shard, [("mt.jpg", b"smaller" * 5000), ("mt.txt", b"mtim")])
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert shard.stat().st_size == stat.st_size
    assert WebDatasetSource(pattern).caption(3) == b"mtim"
    # A corrupt cache is rebuilt too.
    (tmp_path / "000002.tar.idx.json").write_text("{not json")
    assert _records(WebDatasetSource(pattern))[4:] == _records(source)[4:]


def _refuse_writes_in(monkeypatch, folder):
    """Makes `folder` unwritable for index caches (chmod does not restrict root)."""
    real_mkstemp = wds_source.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if os.path.samefile(dir, folder):
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(wds_source.tempfile, "mkstemp", mkstemp)


def test_wds_index_falls_back_to_cache_dir_then_to_memory(tmp_path, monkeypatch):
    pattern, _ = _sample_shards(tmp_path / "shards")
    _refuse_writes_in(monkeypatch, tmp_path / "shards")
    first = _records(WebDatasetSource(pattern))  # No cache_dir: in memory only.
    assert sorted(os.listdir(tmp_path / "shards")) == [f"{s:06d}.tar" for s in range(3)]

    cache_dir = tmp_path / "cache"
    assert _records(WebDatasetSource(pattern, cache_dir=cache_dir)) == first
    assert len(list(cache_dir.glob("*.idx.json"))) == 3
    assert sorted(os.listdir(tmp_path / "shards")) == [f"{s:06d}.tar" for s in range(3)]
    with monkeypatch.context() as patch:
        _forbid_scanning(patch)
        assert _records(WebDatasetSource(pattern, cache_dir=cache_dir)) == first


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_wds_index_goes_to_cache_dir_when_the_shard_folder_is_read_only(tmp_path):
    pattern, _ = _sample_shards(tmp_path / "shards")
    os.chmod(tmp_path / "shards", 0o555)
    try:
        WebDatasetSource(pattern, cache_dir=tmp_path / "cache")
        assert len(list((tmp_path / "cache").glob("*.idx.json"))) == 3
        assert not list((tmp_path / "shards").glob("*.idx.json"))
    finally:
        os.chmod(tmp_path / "shards", 0o755)


def test_wds_incomplete_samples_are_kept_and_reported_when_read(tmp_path):
    shard = _write_tar(
        tmp_path / "s.tar",
        [
            ("a.jpg", b"A"), ("a.txt", b"caption a"),
            ("b.png", b"B"),  # no caption
            ("c.txt", b"caption c"), ("c.json", b"{}"),  # no image
            ("sub/d.jpg", b"D"), ("sub/d.txt", b""),  # key keeps its folder
        ],
    )  # fmt: skip
    source = WebDatasetSource(shard)
    assert len(source) == 4
    assert source[1] == {"key": f"{shard}:b", "image": b"B", "caption": None}
    assert source.caption(1) is None
    with pytest.raises(BadSample) as bad:
        source[2]
    assert bad.value.reason == "missing_file" and "c" in bad.value.detail
    assert source.caption(2) == b"caption c"
    assert source[3] == {"key": f"{shard}:sub/d", "image": b"D", "caption": b""}


def _shard_bytes(tmp_path, count=20, size=3000):
    members = []
    for i in range(count):
        members += [(f"{i:04d}.jpg", bytes([i]) * size), (f"{i:04d}.txt", b"caption %d" % i)]
    return open(_write_tar(tmp_path / "whole.tar", members), "rb").read()


def test_wds_shard_truncated_inside_a_member_is_reported_and_the_member_counted(tmp_path):
    data = _shard_bytes(tmp_path)
    cut = data.index(bytes([12]) * 3000) + 1000  # Inside sample 12's image.
    shard = tmp_path / "cut.tar"
    shard.write_bytes(data[:cut])
    warnings = []
    source = WebDatasetSource(str(shard), warn=warnings.append)
    assert len(source) == 13  # 0..12; what came after the cut is gone.
    assert warnings == [
        f"wds shard {shard}: it ends inside member 0012.jpg (1000 of 3000 bytes): the shard "
        "is truncated, the samples after it are lost and this one is skipped as truncated_member"
    ]
    with pytest.raises(BadSample) as bad:
        source[12]
    assert bad.value.reason == "truncated_member"
    assert source[11]["image"] == bytes([11]) * 3000
    # The cached index keeps the finding: every later start reports it again.
    again = []
    WebDatasetSource(str(shard), warn=again.append)
    assert again == warnings and (tmp_path / "cut.tar.idx.json").is_file()


def test_wds_shard_cut_between_members_is_reported(tmp_path):
    data = _shard_bytes(tmp_path)
    header = data.index(b"0015.jpg")  # The name field starts the member's 512-byte header.
    shard = tmp_path / "cut.tar"
    shard.write_bytes(data[:header])
    warnings = []
    assert len(WebDatasetSource(str(shard), warn=warnings.append)) == 15
    assert len(warnings) == 1 and "without the tar end-of-archive blocks" in warnings[0]
    intact = []
    assert len(WebDatasetSource(str(tmp_path / "whole.tar"), warn=intact.append)) == 20
    assert intact == []


def test_wds_member_names_with_a_second_dot(tmp_path):
    members = [("cat.v1.jpg", b"A"), ("cat.v1.txt", b"a cat"), ("dog.jpg", b"D")]
    members += [("dog.txt", b"a dog"), ("dog.cls", b"3")]  # .cls: another field, not a loss.
    warnings = []
    source = WebDatasetSource(_write_tar(tmp_path / "s.tar", members), warn=warnings.append)
    assert len(source) == 1 and source[0]["caption"] == b"a dog"
    assert warnings == [
        f"wds shard {tmp_path / 's.tar'}: 2 members ignored because a sample's key is the name "
        "up to its first dot, so 'cat.v1.jpg' has extension 'v1.jpg', not an image or caption"
    ]
    only_dots = _write_tar(tmp_path / "dots.tar", members[:2])
    with pytest.raises(ValueError) as error:
        WebDatasetSource(only_dots, warn=lambda _: None)
    assert str(error.value) == (
        f"wds:{only_dots}: no samples in 1 shard(s): 2 members ignored because a sample's key "
        "is the name up to its first dot, so 'cat.v1.jpg' has extension 'v1.jpg', not an "
        "image or caption"
    )


def test_csv_with_a_byte_order_mark_reads_its_header(tmp_path):
    path = tmp_path / "excel.csv"  # Spreadsheets' "CSV UTF-8" starts with U+FEFF.
    path.write_bytes("\ufefffilepath,caption\r\na.jpg,caf\u00e9\r\n".encode("utf-8"))
    (tmp_path / "a.jpg").write_bytes(b"A")
    source = CsvSource(path)
    assert source[0] == {"key": "a.jpg", "image": b"A", "caption": "caf\u00e9"}


def test_wds_pickles_without_descriptors_and_reads_the_same(tmp_path):
    pattern, _ = _sample_shards(tmp_path)
    source = WebDatasetSource(pattern)
    records = _records(source)  # Opens a descriptor per shard.
    clone = pickle.loads(pickle.dumps(source))
    assert clone._fds == {}
    assert _records(clone) == records
    source.close()
    assert _records(source) == records  # Reopens after close.


def test_wds_missing_shards_are_named(tmp_path):
    pattern, _ = _sample_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"000003\.tar"):
        WebDatasetSource(str(tmp_path / "{000000..000003}.tar"))
    with pytest.raises(FileNotFoundError, match=r"nothing/\*\.tar"):
        WebDatasetSource(str(tmp_path / "nothing" / "*.tar"))
    assert len(WebDatasetSource(str(tmp_path / "*.tar"))) == 8  # Globs work too.
    (tmp_path / "packed.tar.gz").write_bytes(b"\x1f\x8b" + b"\0" * 600)
    with pytest.raises(ValueError, match=r"packed\.tar\.gz.*uncompressed"):
        WebDatasetSource(str(tmp_path / "packed.tar.gz"))


# --- ArrayRecord -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption", ["ascii", "ünï ✓", "bad \udce9 byte", b"raw \xff\xfe", b"", None]
)
def test_record_round_trip(caption):
    record = encode_record("dir/ké€y", b"\x89PNG image bytes", caption)
    decoded = decode_record(record)
    expected_caption = _caption_bytes(caption)
    assert decoded == {
        "key": "dir/ké€y",
        "image": b"\x89PNG image bytes",
        "caption": expected_caption,
    }
    assert decode_caption_only(record) == expected_caption
    if caption == "bad \udce9 byte":
        assert decoded["caption"] == b"bad \xe9 byte"


def test_record_errors():
    assert decode_record(encode_record("k", b"", None))["caption"] is None
    assert decode_record(encode_record("k", b"", b""))["caption"] == b""  # Not None.
    with pytest.raises(ValueError, match="magic|MMJ1"):
        decode_record(b"XXXX" + bytes(20))
    with pytest.raises(ValueError, match="shorter"):
        decode_record(encode_record("key", b"", b"caption")[:15])
    with pytest.raises(TypeError, match="shapes/0.*ndarray"):
        encode_record("shapes/0", np.zeros((2, 2, 3), np.uint8), "x")


def _csv_corpus(folder, num_rows, missing=()):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_rows):
        if i not in missing:
            (folder / f"{i:03d}.bin").write_bytes(_image_bytes(i))
        rows.append((f"{i:03d}.bin", f"caption {i}"))
    return _write_table(folder / "c.csv", rows)


def test_write_shards_keeps_source_order_in_contiguous_shards_and_skips_missing(tmp_path):
    csv_path = _csv_corpus(tmp_path / "csv", 13, missing={5})
    csv_source = CsvSource(csv_path)
    out = tmp_path / "ar"
    counts = write_arrayrecord_shards(csv_source, out, 3, progress=False)
    assert counts == {"written": 12, "skipped_missing_file": 1}
    assert sorted(os.listdir(out)) == [f"data-0000{s}-of-00003.array_record" for s in range(3)]

    stored = ArrayRecordSource(str(out / "*.array_record"))
    assert stored.name == f"arrayrecord:{out}/*.array_record"
    expected = [
        {"key": r["key"], "image": r["image"], "caption": r["caption"].encode()}
        for r in (csv_source[i] for i in range(13) if i != 5)
    ]
    assert _records(stored) == expected
    # Shard s holds source rows [s*13//3, (s+1)*13//3): 0-3, 4-7 (without 5), 8-12.
    sizes = [
        len(ArrayRecordSource(str(out / f"data-0000{s}-of-00003.array_record"))) for s in range(3)
    ]
    assert sizes == [4, 3, 5]
    assert [stored.caption(i) for i in range(len(stored))] == [e["caption"] for e in expected]
    clone = pickle.loads(pickle.dumps(stored))
    assert _records(clone) == expected

    # More shards than records: capped.
    assert (
        write_arrayrecord_shards(
            CsvSource(_csv_corpus(tmp_path / "two", 2)), tmp_path / "ar2", 5, progress=False
        )["written"]
        == 2
    )
    assert len(os.listdir(tmp_path / "ar2")) == 2


def test_write_shards_refuses_a_used_folder_and_a_crash_leaves_no_final_names(tmp_path):
    source = CsvSource(_csv_corpus(tmp_path / "csv", 6))
    write_arrayrecord_shards(source, tmp_path / "ar", 2, progress=False)
    with pytest.raises(FileExistsError, match="already holds 2"):
        write_arrayrecord_shards(source, tmp_path / "ar", 2, progress=False)

    class Crashing:
        name = "crashing"

        def __len__(self):
            return 6

        def __getitem__(self, i):
            if i == 4:
                raise RuntimeError("disk on fire")
            return source[i]

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_arrayrecord_shards(Crashing(), tmp_path / "crash", 2, progress=False)
    assert os.listdir(tmp_path / "crash") == []


def test_arrayrecord_source_without_files_names_the_glob(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing/\*\.array_record"):
        ArrayRecordSource(str(tmp_path / "nothing" / "*.array_record"))


# --- One corpus in every format ----------------------------------------------------------


def test_image_corpus_writes_the_shapes_images_and_captions(tmp_path):
    train = write_image_corpus(tmp_path, num_examples=12, image_size=24, split="train")
    evaluation = write_image_corpus(
        tmp_path, num_examples=4, image_size=24, split="eval", fmt="png"
    )
    assert train == tmp_path / "train.csv"
    shapes = ShapesSource("train", 12, 0, 24)
    source = CsvSource(train)
    assert len(source) == 12
    for i in range(12):
        assert source.caption(i) == shapes[i]["caption"]
        with Image.open(source.image_path(i)) as image:
            assert (image.format, image.size) == ("JPEG", (24, 24))
    # The eval split lives beside it without overwriting any train image.
    eval_source = CsvSource(evaluation)
    assert [eval_source.caption(i) for i in range(4)] == [
        ShapesSource("eval", 4, 0, 24)[i]["caption"] for i in range(4)
    ]
    assert Image.open(eval_source.image_path(0)).format == "PNG"
    assert len(list((tmp_path / "images" / "train").iterdir())) == 12


def test_the_same_corpus_reads_identically_as_csv_wds_and_arrayrecord(tmp_path, capsys):
    csv_path = write_image_corpus(tmp_path / "corpus", num_examples=12, image_size=24)
    os.remove(tmp_path / "corpus" / "images" / "train" / "000007.jpg")  # Skipped everywhere.
    pattern = write_wds_shards(csv_path, tmp_path / "wds", shard_size=5)
    assert pattern == str(tmp_path / "wds" / "{000000..000002}.tar")

    assert (
        convert.main([f"csv:{csv_path}", str(tmp_path / "ar"), "--shards", "3", "--no-progress"])
        == 0
    )
    summary = capsys.readouterr().out.strip()
    assert "wrote 11 records" in summary and "missing_file=1" in summary
    assert summary.endswith(f"arrayrecord:{tmp_path}/ar/*.array_record")
    assert convert.main([f"wds:{pattern}", str(tmp_path / "ar_wds"), "--no-progress"]) == 0

    def readable(source):
        out = []
        for i in range(len(source)):
            try:
                record = source[i]
            except BadSample as bad:
                assert bad.reason == "missing_file"
                continue
            out.append((record["image"], _caption_bytes(record["caption"])))
        return out

    expected = readable(CsvSource(csv_path))
    assert len(expected) == 11
    assert readable(WebDatasetSource(pattern)) == expected
    assert readable(ArrayRecordSource(f"{tmp_path}/ar/*.array_record")) == expected
    assert readable(ArrayRecordSource(f"{tmp_path}/ar_wds/*.array_record")) == expected


# --- Specs, mixtures, construction -------------------------------------------------------


def test_parse_spec():
    assert parse_spec("shapes") == ("shapes", "")
    assert parse_spec("csv:/a.csv") == ("csv", "/a.csv")
    assert parse_spec("wds:s/{0..1}.tar") == ("wds", "s/{0..1}.tar")
    assert parse_spec("arrayrecord:/x/*.array_record") == ("arrayrecord", "/x/*.array_record")
    assert parse_spec("csv:C:/odd:name.csv") == ("csv", "C:/odd:name.csv")
    for bad, culprit in [
        ("parquet:/a", "unknown kind 'parquet'"),
        ("/a.csv", "unknown kind"),
        ("csv", "csv needs a path"),
        ("wds:", "wds needs a path"),
        ("shapes:/x", "shapes takes no path"),
    ]:
        with pytest.raises(ValueError, match=culprit) as error:
            parse_spec(bad)
        assert "\n" not in str(error.value)
    with pytest.raises(
        ValueError,
        match=r"\['shapes', 'shapes_video', 'csv', 'wds', 'arrayrecord', 'coco', 'karpathy', "
        r"'folders'\]",
    ):
        parse_spec("nope")


def test_parse_mixture():
    assert parse_mixture("csv:a.csv") == [("csv:a.csv", 1.0)]
    assert parse_mixture("[('csv:a.csv', 0.7), ('wds:b/{0..1}.tar', 0.3)]") == [
        ("csv:a.csv", 0.7),
        ("wds:b/{0..1}.tar", 0.3),
    ]
    assert parse_mixture([["csv:a.csv", 2], ["shapes", 1]]) == [("csv:a.csv", 2.0), ("shapes", 1.0)]
    assert parse_mixture((("shapes", 1), ("shapes", 3))) == [("shapes", 1.0), ("shapes", 3.0)]
    assert parse_mixture(["shapes", ("csv:a.csv", 0.5)]) == [("shapes", 1.0), ("csv:a.csv", 0.5)]
    assert parse_mixture(("csv:a.csv", 0.5)) == [("csv:a.csv", 0.5)]
    for bad, culprit in [
        ("[('csv:a.csv', 0)]", "'csv:a.csv' is 0"),
        ([("wds:b.tar", -1.0)], "'wds:b.tar' is -1"),
        ([("shapes", float("nan"))], "'shapes' is nan"),
        ("[('csv:a.csv', 0.5), ('foo:b', 0.5)]", "unknown kind 'foo'"),
        ("[('csv:a.csv', 0.5", "not a Python literal"),
        ("[]", "empty"),
        ([("csv:a.csv", "0.5")], "not a spec or a"),
        ([("csv:a.csv", True)], "not a spec or a"),
        (3, "must be a spec"),
    ]:
        with pytest.raises(ValueError, match=culprit):
            parse_mixture(bad)


def test_make_source_builds_every_kind(tmp_path, monkeypatch):
    data = _data_config()
    train = make_source("shapes", split="train", data=data, image_size=16)
    evaluation = make_source("shapes", split="eval", data=data, image_size=16)
    assert (len(train), len(evaluation), train.name) == (9, 5, "shapes")
    assert train[2]["key"] == "shapes/train/2" and train[2]["image"].shape == (16, 16, 3)
    assert [train.caption(i) for i in range(9)] == [train[i]["caption"] for i in range(9)]

    (tmp_path / "x.bin").write_bytes(b"X")
    table = _write_table(tmp_path / "t.csv", [("x.bin", "an x")], header=("img", "text"))
    csv_data = _data_config(image_key="img", caption_key="text")
    csv_source = make_source(f"csv:{table}", split="train", data=csv_data, image_size=16)
    assert isinstance(csv_source, CsvSource) and csv_source[0]["image"] == b"X"
    with pytest.raises(ValueError, match="'filepath'"):
        make_source(f"csv:{table}", split="train", data=_data_config(), image_size=16)

    pattern, _ = _sample_shards(tmp_path / "shards")
    _refuse_writes_in(monkeypatch, tmp_path / "shards")
    wds = make_source(
        f"wds:{pattern}", split="eval", data=data, image_size=16, cache_dir=tmp_path / "c"
    )
    assert isinstance(wds, WebDatasetSource) and wds.name == f"wds:{pattern}" and len(wds) == 8
    assert len(list((tmp_path / "c").glob("*.idx.json"))) == 3  # cache_dir passed on

    write_arrayrecord_shards(csv_source, tmp_path / "ar", 1, progress=False)
    spec = f"arrayrecord:{tmp_path}/ar/*.array_record"
    ar = make_source(spec, split="train", data=data, image_size=16)
    assert isinstance(ar, ArrayRecordSource) and ar.name == spec and ar[0]["caption"] == b"an x"


def test_caption_sample_spreads_over_the_source_and_skips_unusable_captions():
    class Numbers:
        name = "numbers"

        def __len__(self):
            return 100

        def caption(self, i):
            if i == 30:
                raise BadSample("missing_file")
            return {40: None, 50: b"\xff bad", 60: "bad \udcff", 70: b"  "}.get(i, str(i).encode())

    assert caption_sample(Numbers(), limit=10) == ["0", "10", "20", "80", "90"]
    assert len(caption_sample(Numbers(), limit=1000)) == 95  # All, minus the five unusable.
    shapes = ShapesSource("eval", 5, 0, 16)
    assert caption_sample(shapes, limit=3) == [shapes[i]["caption"] for i in (0, 1, 3)]


def test_convert_cli_bad_spec_exits_2_with_one_line(tmp_path, capsys):
    for spec in ("foo:x", "shapes", "csv:", "nospec"):
        assert convert.main([spec, str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("convert: error:"), err
    assert convert.main(["csv:x.csv", str(tmp_path / "out"), "--shards", "0"]) == 2
    assert convert.main([f"csv:{tmp_path}/missing.csv", str(tmp_path / "out")]) == 1
    assert "missing.csv" in capsys.readouterr().err
    assert sources.SOURCE_KINDS == ("shapes", "shapes_video", "csv", "wds", "arrayrecord",
                                    "coco", "karpathy", "folders")  # fmt: skip


def test_csv_wds_and_arrayrecord_forms_give_identical_training_batches(tmp_path):
    import itertools

    from mmjax.data.pipeline import train_batches
    from mmjax.data.preprocess import ImageOptions
    from mmjax.text.sentencepiece import train_tokenizer

    csv_path = write_image_corpus(tmp_path / "corpus", num_examples=20, image_size=24)
    pattern = write_wds_shards(csv_path, tmp_path / "wds", shard_size=8)
    assert (
        convert.main([f"csv:{csv_path}", str(tmp_path / "ar"), "--shards", "3", "--no-progress"])
        == 0
    )
    forms = [
        CsvSource(csv_path),
        WebDatasetSource(pattern),
        ArrayRecordSource(f"{tmp_path}/ar/*.array_record"),
    ]
    tokenizer = train_tokenizer(caption_sample(forms[0]), tmp_path / "tok.model", 64)
    options = ImageOptions(image_size=16, train=True, crop_scale=(0.5, 1.0))

    def batches(source):
        stream = train_batches(
            [source],
            tokenizer,
            global_batch_size=8,
            context_length=12,
            seed=4,
            image_options=options,
        )
        return list(itertools.islice(stream, 6))  # 48 positions: more than two epochs.

    expected = batches(forms[0])
    assert len({b["images"].tobytes() for b in expected}) == 6  # Distinct, real batches.
    for form in forms[1:]:
        for got, want in zip(batches(form), expected, strict=True):
            np.testing.assert_array_equal(got["images"], want["images"], err_msg=form.name)
            np.testing.assert_array_equal(got["tokens"], want["tokens"], err_msg=form.name)

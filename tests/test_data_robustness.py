"""Bad samples are skipped and counted exactly; mixtures follow their weights; shares are disjoint.

The sources here are in-memory: every good image is a solid colour that
encodes its index, so any batch row can be traced back to the record it came
from, through any crop.
"""

import io
import itertools
import threading

import numpy as np
import pytest
from PIL import Image

from mmjax.data.pipeline import eval_batches, train_batches
from mmjax.data.preprocess import ImageOptions
from mmjax.data.records import REASONS, BadSample
from mmjax.data.stats import COLUMN, DataError, DataStats
from mmjax.text.sentencepiece import train_tokenizer

SIZE = 8
CONTEXT = 10
TRAIN = ImageOptions(image_size=SIZE, train=True, crop_scale=(0.5, 1.0), max_pixels=10_000)
EVAL = ImageOptions(image_size=SIZE, train=False, max_pixels=10_000)


def _png(index: int, size=(12, 10), mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (index % 256, index // 256, 77)).save(out, "PNG")
    return out.getvalue()


def _index_of(image: np.ndarray) -> int:
    r, g, b = (int(v) for v in image[SIZE // 2, SIZE // 2])
    assert b == 77, "not one of the fixture's good images"
    return r + 256 * g


_TRUNCATED = _png(0, size=(40, 40))[:60]
BAD = {  # reason -> (image bytes or None for a missing file, caption)
    "missing_file": (None, "a caption"),
    "empty_file": (b"", "a caption"),
    "corrupt_image": (_TRUNCATED, "a caption"),
    "unknown_format": (b"this is not an image at all", "a caption"),
    "too_many_pixels": (_png(0, size=(200, 100)), "a caption"),
    "too_few_frames": (None, "a caption"),  # a short clip (tests/test_video.py): raised as is
    "truncated_member": (None, "a caption"),  # a cut tar member (tests/test_sources.py)
    "empty_caption": (_png(0), "   \n "),
    "caption_not_utf8": (_png(0), b"caf\xe9 au lait"),
}
assert set(BAD) == set(REASONS)


class FakeSource:
    """`num` records; `bad` maps index -> reason. Logs every index read."""

    def __init__(self, name, num, bad=None, caption_words=4, offset=0):
        self.name, self.num, self.bad, self.offset = name, num, dict(bad or {}), offset
        self.caption_words = caption_words
        self.reads = []
        self._lock = threading.Lock()

    def __len__(self):
        return self.num

    def caption(self, index):
        if index in self.bad:
            return BAD[self.bad[index]][1]
        return " ".join(["word"] * self.caption_words) + f" {index}"

    def __getitem__(self, index):
        with self._lock:
            self.reads.append(index)
        if index in self.bad:
            image, caption = BAD[self.bad[index]]
            if image is None:
                raise BadSample(self.bad[index], f"{self.name}/{index}.png")
            return {"key": str(index), "image": image, "caption": caption}
        return {
            "key": str(index),
            "image": _png(self.offset + index),
            "caption": self.caption(index),
        }

    def __getstate__(self):  # For grain worker processes.
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    captions = [f"word word word word {i}" for i in range(200)]
    return train_tokenizer(captions, tmp_path_factory.mktemp("tok") / "t.model", 64)


def _bad_every_kind(num=40):
    """Bad samples of every reason at fixed indices, the rest good."""
    return {3 + 4 * i: reason for i, reason in enumerate(REASONS)}


def test_eval_counts_every_kind_of_bad_sample_exactly(tokenizer):
    bad = _bad_every_kind()
    source = FakeSource("fake:eval", 40, bad)
    batches = list(
        eval_batches(
            source, tokenizer, global_batch_size=16, context_length=CONTEXT, image_options=EVAL
        )
    )
    counts = sum(batch["counts"] for batch in batches)
    for reason in REASONS:
        assert counts[0, COLUMN[reason]] == 1, reason
    assert counts[0, COLUMN["used"]] == 40 - len(bad)
    index = np.concatenate([batch["index"] for batch in batches])
    valid = np.concatenate([batch["valid"] for batch in batches])
    # Bad samples and the 8 padding rows are excluded; every good sample appears once.
    assert sorted(index[valid].tolist()) == sorted(set(range(40)) - set(bad))
    images = np.concatenate([batch["images"] for batch in batches])[valid]
    assert [_index_of(image) for image in images] == index[valid].tolist()


def test_train_skips_bad_samples_and_counts_every_read(tokenizer):
    bad = _bad_every_kind()
    source = FakeSource("fake:train", 40, bad)
    batches = train_batches(
        [source],
        tokenizer,
        global_batch_size=8,
        context_length=CONTEXT,
        seed=3,
        image_options=TRAIN,
        num_threads=0,
        prefetch=0,
    )
    taken = list(itertools.islice(batches, 10))  # Two epochs' worth of positions.
    assert taken[0]["counts"].shape == (8, 1, len(COLUMN))  # One row of counters per example.
    counts = sum(batch["counts"].sum(axis=0) for batch in taken)
    seen = [_index_of(image) for batch in taken for image in batch["images"]]
    assert not set(seen) & set(bad), "a bad sample reached a batch"
    assert counts[0, COLUMN["used"]] == 80
    # Every read of a bad index was counted under its reason, and nothing else was.
    for reason in REASONS:
        reads = sum(1 for i in source.reads if bad.get(i) == reason)
        assert reads >= 1
        assert counts[0, COLUMN[reason]] == reads, reason
    assert len(source.reads) == 80 + counts[0, : len(REASONS)].sum()


def test_truncated_captions_are_counted(tokenizer):
    # 6 words + index -> more than CONTEXT - 2 pieces only for the long-caption source.
    long = FakeSource("fake:long", 16, caption_words=20)
    batch = next(
        eval_batches(
            long, tokenizer, global_batch_size=16, context_length=CONTEXT, image_options=EVAL
        )
    )
    assert batch["counts"][0, COLUMN["truncated_caption"]] == 16
    assert (batch["tokens"][:, -1] == tokenizer.eos_id).all()
    short = FakeSource("fake:short", 16, caption_words=1)
    batch = next(
        eval_batches(
            short, tokenizer, global_batch_size=16, context_length=CONTEXT, image_options=EVAL
        )
    )
    assert batch["counts"][0, COLUMN["truncated_caption"]] == 0


def test_all_bad_source_stops_with_a_clear_error(tokenizer):
    source = FakeSource("fake:broken", 20, {i: "corrupt_image" for i in range(20)})
    batches = train_batches(
        [source], tokenizer, global_batch_size=4, context_length=CONTEXT, seed=0,
        image_options=TRAIN,
    )  # fmt: skip
    with pytest.raises(DataError, match="fake:broken.*corrupt_image"):
        next(batches)


def test_skip_fraction_threshold_names_source_and_commonest_reason():
    stats = DataStats(["csv:a.csv", "wds:b.tar"])
    counts = stats.counts.copy()
    counts[0, COLUMN["used"]] = 990
    counts[0, COLUMN["missing_file"]] = 10  # 1%: fine
    counts[1, COLUMN["used"]] = 80
    counts[1, COLUMN["empty_file"]] = 5
    counts[1, COLUMN["corrupt_image"]] = 15  # 20% bad, mostly corrupt
    stats.add(counts)
    assert stats.check(0.25, 100) == []  # Under the threshold.
    # wds:b.tar has seen only 100 samples: not judged yet, but a warning says what it found.
    (warning,) = stats.check(0.05, 101)
    assert warning.startswith("source wds:b.tar: 20 of 100 samples read were bad (20.0% > ")
    assert "goes on only because fewer than data.min_samples_for_skip_check=101" in warning
    assert stats.over_limit(0.05) == [("wds:b.tar", 20, 100, "corrupt_image")]
    with pytest.raises(DataError, match=r"wds:b\.tar: 20 of 100 .*commonest reason: corrupt_image"):
        stats.check(0.05, 100)
    metrics = stats.metrics()
    assert metrics["data/skipped_corrupt_image"] == 15
    assert metrics["data/skipped_missing_file"] == 10
    assert metrics["data/skipped"] == 30
    restored = DataStats(["csv:a.csv", "wds:b.tar"])
    restored.load_json(stats.to_json())
    np.testing.assert_array_equal(restored.counts, stats.counts)
    with pytest.raises(ValueError, match="sources"):
        DataStats(["csv:other.csv"]).load_json(stats.to_json())


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.1, 0.9)])
def test_mixture_follows_weights(tokenizer, weights):
    big = FakeSource("fake:big", 500)
    rare = FakeSource("fake:rare", 10, offset=1000)  # Oversampled when its weight is high.
    batches = train_batches(
        [big, rare],
        tokenizer,
        weights=weights,
        global_batch_size=50,
        context_length=CONTEXT,
        seed=0,
        image_options=TRAIN,
    )
    taken = list(itertools.islice(batches, 20))
    picks = np.array([_index_of(image) >= 1000 for batch in taken for image in batch["images"]])
    assert abs(picks.mean() - weights[1] / sum(weights)) < 0.01
    counts = sum(batch["counts"].sum(axis=0) for batch in taken)
    assert counts[:, COLUMN["used"]].tolist() == [(~picks).sum(), picks.sum()]
    if weights[1] > 0.5:  # The 10-sample source repeats many times over.
        assert len({i for i in picks.nonzero()[0]}) > 10


def test_process_shares_are_disjoint_and_cover_an_epoch(tokenizer):
    source = FakeSource("fake:share", 48)
    shares = []
    for process in range(2):
        batches = train_batches(
            [source],
            tokenizer,
            global_batch_size=8,
            context_length=CONTEXT,
            seed=1,
            image_options=TRAIN,
            process_index=process,
            process_count=2,
        )
        epoch = list(itertools.islice(batches, 6))  # 6 steps x 8 = one epoch of 48.
        assert all(batch["images"].shape[0] == 4 for batch in epoch)
        shares.append([_index_of(image) for batch in epoch for image in batch["images"]])
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(48))


def _assert_same(actual, expected):
    for got, want in zip(actual, expected, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_resume_mid_epoch_and_worker_processes_give_the_same_batches(tokenizer):
    bad = _bad_every_kind()
    source = FakeSource("fake:resume", 40, bad)
    options = dict(
        global_batch_size=8, context_length=CONTEXT, seed=5, image_options=TRAIN, weights=[1.0]
    )
    straight = list(itertools.islice(train_batches([source], tokenizer, **options), 9))
    resumed = list(itertools.islice(train_batches([source], tokenizer, start_step=3, **options), 6))
    _assert_same(resumed, straight[3:])
    in_workers = list(
        itertools.islice(train_batches([source], tokenizer, start_step=3, workers=2, **options), 6)
    )
    _assert_same(in_workers, straight[3:])

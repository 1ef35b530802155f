"""grain pipelines: resumable step-addressed training batches, sharded eval batches."""

import itertools

import numpy as np
import pytest

from mmjax.data.pipeline import eval_batches, num_eval_batches, train_batches
from mmjax.data.preprocess import ImageOptions
from mmjax.data.shapes import ShapesSource, all_captions
from mmjax.text.sentencepiece import train_tokenizer

NUM_EXAMPLES = 40
CONTEXT_LENGTH = 12
TRAIN = ImageOptions(image_size=16, train=True)
EVAL = ImageOptions(image_size=16, train=False)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(all_captions(), tmp_path_factory.mktemp("tok") / "tokenizer.model", 128)


@pytest.fixture(scope="module")
def source():
    return ShapesSource("train", num_examples=NUM_EXAMPLES, image_size=16)


@pytest.fixture(scope="module")
def index_of_image(source):
    """Maps image bytes back to the dataset index (all images are distinct)."""
    lookup = {source[i]["image"].tobytes(): i for i in range(len(source))}
    assert len(lookup) == len(source)
    return lookup


def _take(iterator, count):
    return list(itertools.islice(iterator, count))


def _indices(batch, index_of_image):
    return [index_of_image[image.tobytes()] for image in batch["images"]]


def _train(source, tokenizer, **overrides):
    options = dict(global_batch_size=8, context_length=CONTEXT_LENGTH, seed=0, image_options=TRAIN)
    options.update(overrides)
    return train_batches([source], tokenizer, **options)


def _assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_train_batch_structure_and_image_caption_pairing(source, tokenizer, index_of_image):
    batch = next(_train(source, tokenizer))
    assert set(batch) == {"images", "tokens", "counts"}
    assert batch["images"].dtype == np.uint8 and batch["images"].shape == (8, 16, 16, 3)
    assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (8, CONTEXT_LENGTH)
    # Each row's tokens are the caption of that row's image.
    for index, tokens in zip(_indices(batch, index_of_image), batch["tokens"], strict=True):
        assert tokenizer.decode(tokens) == source[index]["caption"]


def test_resuming_at_a_step_replays_the_uninterrupted_run(source, tokenizer):
    uninterrupted = _take(_train(source, tokenizer), 9)
    resumed = _take(_train(source, tokenizer, start_step=4), 5)
    _assert_same_batches(resumed, uninterrupted[4:])


def test_process_shares_concatenate_to_the_global_batch(source, tokenizer):
    global_batches = _take(_train(source, tokenizer), 7)
    shares = [
        _take(_train(source, tokenizer, process_index=p, process_count=2, start_step=2), 5)
        for p in range(2)
    ]
    for step, (first, second) in enumerate(zip(*shares, strict=True), start=2):
        assert first["images"].shape[0] == 4
        np.testing.assert_array_equal(
            np.concatenate([first["images"], second["images"]]), global_batches[step]["images"]
        )
        np.testing.assert_array_equal(
            np.concatenate([first["tokens"], second["tokens"]]), global_batches[step]["tokens"]
        )


def test_each_epoch_is_a_fresh_permutation(source, tokenizer, index_of_image):
    steps_per_epoch = NUM_EXAMPLES // 8
    stream = [
        i
        for batch in _take(_train(source, tokenizer), 3 * steps_per_epoch)
        for i in _indices(batch, index_of_image)
    ]
    epochs = [stream[e * NUM_EXAMPLES : (e + 1) * NUM_EXAMPLES] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(NUM_EXAMPLES))
    assert epochs[0] != list(range(NUM_EXAMPLES))
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]


def test_neighbouring_seeds_do_not_share_epoch_orders(source, tokenizer, index_of_image):
    # grain seeds epoch e with seed + e; the pipeline hashes the seed so that
    # seed 1's first epoch is not seed 0's second.
    steps_per_epoch = NUM_EXAMPLES // 8

    def epoch(seed, number):
        batches = _take(
            _train(source, tokenizer, seed=seed, start_step=number * steps_per_epoch),
            steps_per_epoch,
        )
        return [i for batch in batches for i in _indices(batch, index_of_image)]

    assert epoch(seed=1, number=0) != epoch(seed=0, number=1)
    assert epoch(seed=0, number=0) != epoch(seed=1, number=0)


def test_thread_count_does_not_change_the_batches(source, tokenizer):
    _assert_same_batches(
        _take(_train(source, tokenizer, num_threads=0, prefetch=0), 4),
        _take(_train(source, tokenizer, num_threads=2, prefetch=4), 4),
    )


def test_train_rejects_bad_sharding(source, tokenizer):
    with pytest.raises(ValueError, match="batch_size 9 is not divisible by process_count 2"):
        _train(source, tokenizer, global_batch_size=9, process_count=2)
    with pytest.raises(ValueError, match="process_index 2"):
        _train(source, tokenizer, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="start_step"):
        _train(source, tokenizer, start_step=-1)
    with pytest.raises(ValueError, match="batch_size"):
        eval_batches(
            source,
            tokenizer,
            global_batch_size=8,
            context_length=CONTEXT_LENGTH,
            image_options=EVAL,
            process_count=3,
        )


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_covers_every_example_once_in_order(tokenizer, process_count):
    source = ShapesSource("eval", num_examples=13, image_size=16)
    global_batch_size = 6
    assert num_eval_batches(source, global_batch_size=global_batch_size) == 3
    shares = [
        list(
            eval_batches(
                source,
                tokenizer,
                global_batch_size=global_batch_size,
                context_length=CONTEXT_LENGTH,
                image_options=EVAL,
                process_index=p,
                process_count=process_count,
            )
        )
        for p in range(process_count)
    ]
    # Every process gets the same number of full-size batches.
    assert [len(batches) for batches in shares] == [3] * process_count
    rows = global_batch_size // process_count
    for batches in shares:
        for batch in batches:
            assert batch["images"].shape == (rows, 16, 16, 3) and batch["images"].dtype == np.uint8
            assert (
                batch["tokens"].shape == (rows, CONTEXT_LENGTH)
                and batch["tokens"].dtype == np.int32
            )
            assert batch["index"].dtype == np.int64 and batch["valid"].dtype == bool
            assert isinstance(batch["captions"], list) and len(batch["captions"]) == rows

    # Process p holds rows [p*b, (p+1)*b) of each global batch.
    index = np.concatenate(
        [np.concatenate([share[step]["index"] for share in shares]) for step in range(3)]
    )
    valid = np.concatenate(
        [np.concatenate([share[step]["valid"] for share in shares]) for step in range(3)]
    )
    np.testing.assert_array_equal(index, [*range(13), -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(valid, index >= 0)

    for share in shares:
        for batch in share:
            for row in np.flatnonzero(batch["valid"]):
                example = source[int(batch["index"][row])]
                np.testing.assert_array_equal(batch["images"][row], example["image"])
                assert batch["captions"][row] == example["caption"]
                assert tokenizer.decode(batch["tokens"][row]) == example["caption"]

"""grain input pipelines: training batches addressed by step, ordered eval batches.

Training reads an endless stream: each source is shuffled (a new permutation
every epoch) and repeated, and a mixture interleaves the sources in
proportion to their weights. Stream position n is a pure function of (seed,
n), so the position step * global_batch_size is the whole iterator state:
resuming at step s rebuilds the pipeline with start_step=s and yields exactly
the batches an uninterrupted run would have seen, with any number of grain
workers. Each process reads only its own rows of every global batch.

A bad sample (see mmjax.data.records) is replaced by another sample of the
same source, drawn deterministically from (seed, n, attempt), and counted;
the counts travel inside the batches (mmjax.data.stats).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Iterator, Sequence, Sized
from typing import Any

import grain
import numpy as np
from absl import flags as absl_flags

from mmjax.data.clips import load_clip
from mmjax.data.preprocess import ImageOptions, decode_caption, load_image
from mmjax.data.records import BadSample, Source
from mmjax.data.stats import COLUMN, DataError, empty_counts
from mmjax.text.tokenizer import TextTokenizer

# A source whose samples fail this many times in a row is broken, not noisy.
MAX_ATTEMPTS = 64


@dataclasses.dataclass(frozen=True)
class ExampleLoader:
    """Reads, decodes and tokenises one example; picklable for grain workers."""

    sources: tuple[Source, ...]
    tokenizer: TextTokenizer
    image_options: ImageOptions
    context_length: int
    seed: int = 0

    def load(self, source_id: int, index: int, rng: np.random.Generator | None) -> dict[str, Any]:
        """One example or BadSample. Captions first: they are cheaper to reject."""
        record = self.sources[source_id][index]
        caption = decode_caption(record.get("caption"))
        if self.image_options.frames:  # model.input_kind='video': clips [T, S, S, 3]
            image = load_clip(record["image"], self.image_options, rng)
        else:
            image = load_image(record["image"], self.image_options, rng)
        tokens, truncated = self.tokenizer.encode(caption, self.context_length)
        return {"image": image, "tokens": tokens, "caption": caption, "truncated": truncated}

    def train_example(self, position: int, pick: tuple[int, int]) -> dict[str, Any]:
        """Stream position -> example; bad samples are replaced from the same source."""
        source_id, index = pick
        source = self.sources[source_id]
        counts = empty_counts(len(self.sources))
        for attempt in range(MAX_ATTEMPTS):
            rng = np.random.default_rng([self.seed, position, attempt])
            if attempt:  # Another sample of the same source, fixed by (seed, position, attempt).
                index = int(rng.integers(len(source)))
            try:
                example = self.load(source_id, index, rng)
            except BadSample as bad:
                counts[source_id, COLUMN[bad.reason]] += 1
                last = bad
                continue
            counts[source_id, COLUMN["used"]] += 1
            counts[source_id, COLUMN["truncated_caption"]] += int(example["truncated"])
            return {"image": example["image"], "tokens": example["tokens"], "counts": counts}
        raise DataError(
            f"source {source.name}: {MAX_ATTEMPTS} samples in a row were bad near stream "
            f"position {position}; last: {last}"
        )

    def eval_example(self, row: int, *, num_examples: int) -> dict[str, Any]:
        """Row of the padded eval sequence; bad or padding rows come back valid=False."""
        counts = empty_counts(len(self.sources))
        valid = row < num_examples
        try:
            example = self.load(0, row % num_examples, None)
        except BadSample as bad:
            counts[0, COLUMN[bad.reason]] += int(valid)
            example = {
                "image": np.zeros(self.image_options.shape, np.uint8),
                "tokens": self.tokenizer.encode("", self.context_length)[0],
                "caption": "",
            }
            valid = False
        else:
            counts[0, COLUMN["used"]] += int(valid)
            counts[0, COLUMN["truncated_caption"]] += int(example["truncated"] and valid)
        return {
            "image": example["image"],
            "tokens": example["tokens"],
            "caption": example["caption"],
            "index": row if valid else -1,
            "valid": valid,
            "counts": counts,
        }


def require_usable(source: Source, image_options: ImageOptions, where: str) -> None:
    """Raises DataError (one line naming `where`, the source and the commonest reason) when
    none of up to MAX_ATTEMPTS samples spread over `source` is usable: a source that training
    could only fail on, found before anything compiles. Stops at the first good sample."""
    if len(source) == 0:
        raise DataError(f"{where}: source {source.name} has no samples")
    image_options = dataclasses.replace(image_options, train=False)  # No random draws.
    reasons: dict[str, int] = {}
    count = min(len(source), MAX_ATTEMPTS)
    for i in range(count):
        index = i * len(source) // count
        try:
            record = source[index]
            decode_caption(record.get("caption"))
            if image_options.frames:
                load_clip(record["image"], image_options, None)
            else:
                load_image(record["image"], image_options, None)
            return
        except BadSample as bad:
            reasons[bad.reason] = reasons.get(bad.reason, 0) + 1
    commonest = max(reasons, key=reasons.get)
    raise DataError(
        f"{where}: source {source.name} has no usable sample: the {count} read, spread over "
        f"its {len(source)}, were all bad (commonest reason: {commonest}, {reasons[commonest]})"
    )


def train_batches(
    sources: Sequence[Source],
    tokenizer: TextTokenizer,
    *,
    global_batch_size: int,
    context_length: int,
    seed: int,
    image_options: ImageOptions,
    weights: Sequence[float] | None = None,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    workers: int = 0,
    num_threads: int = 2,
    prefetch: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless {"images": uint8 [b,H,W,3], "tokens": int32 [b,L], "counts": int32 [b,S,C]}.

    With image_options.frames = T, "images" holds clips, uint8 [b,T,H,W,3].

    b = global_batch_size // process_count. Process p's batch at step s holds
    stream positions [s*B + p*b, s*B + (p+1)*b) (B the global batch size).
    `counts` holds each row's stats.COUNTERS (the bad samples skipped to fill it, itself).
    """
    batch_size = _per_process_batch_size(global_batch_size, process_index, process_count)
    sources = tuple(sources)
    weights = [1.0] * len(sources) if weights is None else list(weights)
    if not sources or len(weights) != len(sources):
        raise ValueError(f"need one weight per source, got {len(weights)} for {len(sources)}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    for source in sources:
        if len(source) == 0:
            raise ValueError(f"train source {source.name} is empty")
    components = [
        grain.MapDataset.range(len(source))
        .shuffle(seed=_shuffle_seed(seed, source_id))
        # Infinite; grain reseeds the shuffle per epoch, so epochs differ.
        .repeat()
        .map(functools.partial(_tag, source_id))
        for source_id, source in enumerate(sources)
    ]
    # grain's mixture interleaves by the weights deterministically, so every
    # window of the stream (and every global batch) follows them closely.
    stream = components[0] if len(components) == 1 else grain.MapDataset.mix(components, weights)
    loader = ExampleLoader(sources, tokenizer, image_options, context_length, seed)
    dataset = stream.map_with_index(loader.train_example).batch(
        batch_size, batch_fn=_stack_train_examples
    )
    # Per-process batch j covers stream positions [j*b, (j+1)*b): taking every
    # process_count-th one, starting at process_index, gives this process its
    # rows of each global batch.
    dataset = dataset[process_index::process_count][start_step:]
    return _iterate(dataset, workers=workers, num_threads=num_threads, prefetch=prefetch)


def eval_batches(
    source: Source,
    tokenizer: TextTokenizer,
    *,
    global_batch_size: int,
    context_length: int,
    image_options: ImageOptions,
    process_index: int = 0,
    process_count: int = 1,
    workers: int = 0,
    num_threads: int = 2,
    prefetch: int = 4,
) -> Iterator[dict[str, Any]]:
    """Every example of `source` exactly once, in index order.

    Batches: {"images": uint8 [b,H,W,3] (clips: [b,T,H,W,3]), "tokens": int32 [b,L], "captions":
    list[str], "index": int64 [b], "valid": bool [b], "counts": int64 [1,C]}.
    The last global batch is filled up with repeats of earlier examples, and
    bad samples are replaced by blanks; both are marked valid=False and
    index=-1, so every process gets the same number of full-size batches.
    Process p gets rows [p*b, (p+1)*b) of each global batch.
    """
    batch_size = _per_process_batch_size(global_batch_size, process_index, process_count)
    if len(source) == 0:
        raise ValueError(f"eval source {source.name} is empty")
    num_rows = num_eval_batches(source, global_batch_size=global_batch_size) * global_batch_size
    loader = ExampleLoader((source,), tokenizer, image_options, context_length)
    dataset = (
        grain.MapDataset.range(num_rows)
        .map(functools.partial(loader.eval_example, num_examples=len(source)))
        .batch(batch_size, batch_fn=_stack_eval_examples)
    )
    dataset = dataset[process_index::process_count]
    return _iterate(dataset, workers=workers, num_threads=num_threads, prefetch=prefetch)


def num_eval_batches(source: Sized, *, global_batch_size: int) -> int:
    """How many batches eval_batches yields (on every process)."""
    if global_batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {global_batch_size}")
    return math.ceil(len(source) / global_batch_size)


def _iterate(dataset: grain.MapDataset, *, workers: int, num_threads: int, prefetch: int):
    if workers < 0:
        raise ValueError(f"data.workers must be >= 0, got {workers}")
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    iterable = dataset.to_iter_dataset(read_options)
    if workers:
        # grain's worker processes read absl flags, which a non-absl program never
        # parses; their defaults are what we want.
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        _quiet_resource_tracker()
        # Worker processes decode in parallel; grain returns their batches in order.
        options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch)
        iterable = iterable.mp_prefetch(options)
    return iter(iterable)


# What multiprocessing's resource tracker says at exit about grain's batches still in flight
# (in shared memory) when a run stops: it unlinks them, so nothing leaks, but the warning
# would be the last line a stopped run prints, after the line saying why it stopped.
_TRACKER_WARNING = "ignore:resource_tracker:UserWarning"  # -W fields: no colons inside


def _quiet_resource_tracker() -> None:
    """Passes a filter for that warning to the tracker process, which takes its warning
    options from this interpreter's when grain's first worker starts it."""
    if _TRACKER_WARNING not in sys.warnoptions:
        sys.warnoptions.append(_TRACKER_WARNING)


def _tag(source_id: int, index: int) -> tuple[int, int]:
    return source_id, int(index)


def _per_process_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {global_batch_size}")
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index {process_index} out of range for process_count {process_count}"
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"batch_size {global_batch_size} is not divisible by process_count {process_count}"
        )
    return global_batch_size // process_count


def _shuffle_seed(seed: int, source_id: int = 0) -> int:
    # grain shuffles epoch e with seed + e, so raw seeds s and s+1 would share
    # all but one epoch order; hashing to 32 bits (grain's range) avoids that.
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(np.random.SeedSequence([seed, source_id]).generate_state(1)[0])


def _stack_train_examples(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    # Counts stay per row (int32 [b, S, C]): the trainer sums them on the devices with the
    # step, so every process gets the global counts of every step without a host sync.
    return {
        "images": np.stack([example["image"] for example in examples]),
        "tokens": np.stack([example["tokens"] for example in examples]),
        "counts": np.stack([example["counts"] for example in examples]).astype(np.int32),
    }


def _stack_eval_examples(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "images": np.stack([example["image"] for example in examples]),
        "tokens": np.stack([example["tokens"] for example in examples]),
        "captions": [example["caption"] for example in examples],
        "index": np.array([example["index"] for example in examples], np.int64),
        "valid": np.array([example["valid"] for example in examples], bool),
        "counts": np.sum([example["counts"] for example in examples], axis=0),
    }

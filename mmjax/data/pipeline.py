"""grain input pipelines: training batches addressed by step, ordered eval batches.

Training reads an endless shuffled stream whose position is the global sample
index step * global_batch_size, so resuming at step s needs no iterator state:
the pipeline is rebuilt with start_step=s and yields exactly the batches an
uninterrupted run would have seen. Each process reads only its own rows of
every global batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence, Sized
from typing import Any

import grain
import numpy as np

from mmjax.tokenizer import Tokenizer


def train_batches(
    source: grain.sources.RandomAccessDataSource,
    tokenizer: Tokenizer,
    *,
    global_batch_size: int,
    context_length: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
    prefetch: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless {"images": uint8 [b, H, W, 3], "tokens": int32 [b, L]} batches.

    b = global_batch_size // process_count. Process p's batch at step s holds
    examples [s*B + p*b, s*B + (p+1)*b) of the shuffled stream (B the global
    batch size); every epoch is a different permutation of `source`.
    """
    batch_size = _per_process_batch_size(global_batch_size, process_index, process_count)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if len(source) == 0:
        raise ValueError(f"train source {source!r} is empty")
    dataset = (
        grain.MapDataset.source(source)
        .shuffle(seed=_shuffle_seed(seed))
        # Infinite; grain reseeds the shuffle per epoch, so epochs differ.
        .repeat()
        .map(functools.partial(_train_example, tokenizer=tokenizer, context_length=context_length))
        .batch(batch_size, batch_fn=_stack_train_examples)
    )
    # Per-process batch j covers stream examples [j*b, (j+1)*b): taking every
    # process_count-th one, starting at process_index, gives this process its
    # rows of each global batch.
    dataset = dataset[process_index::process_count][start_step:]
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(read_options))


def eval_batches(
    source: grain.sources.RandomAccessDataSource,
    tokenizer: Tokenizer,
    *,
    global_batch_size: int,
    context_length: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
    prefetch: int = 4,
) -> Iterator[dict[str, Any]]:
    """Every example of `source` exactly once, in index order.

    Batches: {"images": uint8 [b, H, W, 3], "tokens": int32 [b, L],
    "captions": list[str], "index": int64 [b], "valid": bool [b]}. The last
    global batch is filled up with repeats of earlier examples marked
    valid=False and index=-1, so every process gets the same number of
    full-size batches. Process p gets rows [p*b, (p+1)*b) of each global batch.
    """
    batch_size = _per_process_batch_size(global_batch_size, process_index, process_count)
    if len(source) == 0:
        raise ValueError(f"eval source {source!r} is empty")
    num_rows = num_eval_batches(source, global_batch_size=global_batch_size) * global_batch_size
    dataset = (
        grain.MapDataset.range(num_rows)
        .map(
            functools.partial(
                _eval_example, source=source, tokenizer=tokenizer, context_length=context_length
            )
        )
        .batch(batch_size, batch_fn=_stack_eval_examples)
    )
    dataset = dataset[process_index::process_count]
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(read_options))


def num_eval_batches(source: Sized, *, global_batch_size: int) -> int:
    """How many batches eval_batches yields (on every process)."""
    if global_batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {global_batch_size}")
    return math.ceil(len(source) / global_batch_size)


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


def _shuffle_seed(seed: int) -> int:
    # grain shuffles epoch e with seed + e, so raw seeds s and s+1 would share
    # all but one epoch order; hashing to 32 bits (grain's range) avoids that.
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


def _train_example(
    example: dict[str, Any], *, tokenizer: Tokenizer, context_length: int
) -> dict[str, np.ndarray]:
    # The image stays uint8: normalising on the device moves 4x fewer bytes.
    return {
        "image": np.asarray(example["image"], np.uint8),
        "tokens": tokenizer.encode_batch([example["caption"]], context_length)[0],
    }


def _stack_train_examples(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {
        "images": np.stack([example["image"] for example in examples]),
        "tokens": np.stack([example["tokens"] for example in examples]),
    }


def _eval_example(
    row: int,
    *,
    source: grain.sources.RandomAccessDataSource,
    tokenizer: Tokenizer,
    context_length: int,
) -> dict[str, Any]:
    valid = row < len(source)
    # Padding rows repeat an earlier example: same shapes, ignored via `valid`.
    example = source[row % len(source)]
    return {
        "image": np.asarray(example["image"], np.uint8),
        "tokens": tokenizer.encode_batch([example["caption"]], context_length)[0],
        "caption": example["caption"],
        "index": row if valid else -1,
        "valid": valid,
    }


def _stack_eval_examples(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "images": np.stack([example["image"] for example in examples]),
        "tokens": np.stack([example["tokens"] for example in examples]),
        "captions": [example["caption"] for example in examples],
        "index": np.array([example["index"] for example in examples], np.int64),
        "valid": np.array([example["valid"] for example in examples], bool),
    }

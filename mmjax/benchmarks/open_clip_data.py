"""open_clip's own training input pipeline on webdataset shards: the peer side of
`mmjax bench data --against open_clip`.

It is open_clip_train's `get_wds_dataset` as `open_clip_train.main` builds it with
`--dataset-resampled` (shards drawn with replacement, so a short corpus never runs dry):
webdataset decoding to PIL, open_clip's training transform (RandomResizedCrop, ToTensor,
Normalize: float32 tensors on the host), its CLIP BPE tokenizer, a torch DataLoader with
`workers` worker processes.
"""

from __future__ import annotations

import argparse
import itertools
import time

from mmjax.interop.torch_import import MissingExtra, import_open_clip


def _get_wds_dataset():
    try:
        from open_clip_train.data import get_wds_dataset
    except ImportError as e:
        raise MissingExtra(
            f"open_clip's training package cannot be imported ({e}); install the openclip "
            "extra: pip install -e '.[openclip]'"
        ) from None
    return get_wds_dataset


def open_clip_rate(
    urls: str,
    *,
    examples: int,
    batch_size: int,
    workers: int,
    image_size: int,
    crop_scale: tuple[float, float],
    context_length: int,
    seed: int = 0,
) -> float:
    """Examples/s of open_clip's loader over the shards `urls` (a brace pattern), after its
    first batch (worker start-up excluded, as for mmjax's pipeline)."""
    _, open_clip = import_open_clip()
    get_wds_dataset = _get_wds_dataset()
    steps = max(1, examples // batch_size)
    args = argparse.Namespace(
        train_data=urls,
        train_num_samples=(steps + 1 + workers) * batch_size,
        dataset_resampled=True,
        train_data_upsampling_factors=None,
        seed=seed,
        batch_size=batch_size,
        workers=workers,
        world_size=1,
    )
    transform = open_clip.image_transform(image_size, is_train=True, aug_cfg={"scale": crop_scale})
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    loader = get_wds_dataset(
        args, transform, is_train=True, epoch=0, tokenizer=tokenizer
    ).dataloader
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    done = 0
    for images, _ in itertools.islice(batches, steps):
        done += images.shape[0]
    seconds = time.perf_counter() - start
    del batches, loader  # Ends the persistent workers.
    return done / seconds

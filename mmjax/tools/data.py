"""Converts a CSV or WebDataset corpus into ArrayRecord shards.

    python -m mmjax.tools.data csv:/data/train.csv /data/train_ar --shards 64
    python -m mmjax.tools.data 'wds:/data/{000000..000099}.tar' /data/train_ar

Records keep the source's order, encoded image bytes and raw caption bytes;
samples whose image cannot be read are skipped and counted. Train on the
result with the spec it prints: `arrayrecord:OUT_DIR/*.array_record`.
Exit status: 0 done, 1 the source or output could not be used, 2 bad arguments.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from mmjax.data.arrayrecord_source import ArrayRecordSource, write_arrayrecord_shards
from mmjax.data.csv_source import CsvSource
from mmjax.data.sources import parse_spec
from mmjax.data.wds_source import WebDatasetSource
from mmjax.runtime import cli

CONVERTIBLE = ("csv", "wds", "arrayrecord")  # arrayrecord -> arrayrecord re-shards


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m mmjax.tools.data", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("src_spec", help="csv:PATH, wds:PATTERN or arrayrecord:GLOB")
    parser.add_argument("out_dir", help="folder for the shards (must hold no .array_record)")
    parser.add_argument("--shards", type=int, default=16, help="number of output shards")
    parser.add_argument("--image-key", default="filepath", help="csv: image path column")
    parser.add_argument("--caption-key", default="caption", help="csv: caption column")
    parser.add_argument(
        "--cache-dir", default=None, help="wds: index cache if shards are read-only"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        kind, path = parse_spec(args.src_spec)
        if kind not in CONVERTIBLE:
            raise ValueError(
                f"cannot convert {args.src_spec!r}; give one of csv:, wds:, arrayrecord:"
            )
        if args.shards < 1:
            raise ValueError(f"--shards must be >= 1, got {args.shards}")
    except ValueError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2

    try:
        if kind == "csv":
            source = CsvSource(path, image_key=args.image_key, caption_key=args.caption_key)
        elif kind == "wds":
            source = WebDatasetSource(path, cache_dir=args.cache_dir)
        else:
            source = ArrayRecordSource(path)
        counts = write_arrayrecord_shards(
            source, args.out_dir, args.shards, progress=not args.no_progress
        )
    except (OSError, ValueError, TypeError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1

    skipped = ", ".join(
        f"{key.removeprefix('skipped_')}={value}"
        for key, value in sorted(counts.items())
        if key.startswith("skipped_")
    )
    output_glob = os.path.join(args.out_dir, "*.array_record")
    print(
        f"wrote {counts['written']} records from {source.name} ({len(source)} samples; "
        f"skipped {skipped}); train with: arrayrecord:{output_glob}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

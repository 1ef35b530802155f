"""Writes the built-in shapes corpus as image files + CSV (+ tar shards): `mmjax data corpus`.

    mmjax data corpus /tmp/corpus --num-examples 2000 --wds-shard-size 500

See mmjax.data.image_corpus for the layout. Prints the CSV path (and the shard pattern), ready
for `csv:PATH` / `wds:PATTERN` specs. Exit status: 0 done, 1 the output could not be written,
2 bad arguments.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from mmjax.data.image_corpus import FORMATS, write_image_corpus, write_wds_shards
from mmjax.runtime import cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="mmjax data corpus", description=__doc__.split("\n", 1)[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num-examples", type=int, required=True)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--split", choices=("train", "eval"), default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=tuple(FORMATS), default="jpeg")
    parser.add_argument(
        "--wds-shard-size", type=int, default=0, help="also write tar shards of this many samples"
    )
    args = parser.parse_args(argv)
    try:
        csv_path = write_image_corpus(
            args.out_dir,
            num_examples=args.num_examples,
            image_size=args.image_size,
            split=args.split,
            seed=args.seed,
            fmt=args.format,
            progress=True,
        )
        print(csv_path)
        if args.wds_shard_size:
            wds_dir = Path(args.out_dir) / f"wds_{args.split}"
            print(write_wds_shards(csv_path, wds_dir, shard_size=args.wds_shard_size))
    except (OSError, ValueError) as e:
        print(f"image_corpus: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

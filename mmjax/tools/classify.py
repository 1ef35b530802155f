"""Zero-shot classification of image files with a trained workdir's contrastive towers.

  python -m mmjax.tools.classify --workdir runs/coca_tiny \
      --classes configs/zeroshot/shapes_shapes.txt \
      --templates configs/zeroshot/shapes_shape_templates.txt [-k 3] IMAGE...

Prints one line per image, in input order: `path<TAB>label<TAB>probability` (the top
class), or with -k K > 1 `path<TAB>label:prob<TAB>label:prob...` for the top K, best first.
Probabilities are a softmax over all classes of logit_scale * cosine(image, class), where
a class embedding averages its prompts (mmjax.inference.prompts). An unreadable image stops the
command with `error: cannot read image PATH: REASON` and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mmjax.inference.predictor import BadImage, Predictor, unreadable_files
from mmjax.inference.prompts import read_classes, read_templates
from mmjax.runtime import cli, log
from mmjax.runtime.checkpoint import CheckpointError


def format_line(path: str, ranked: Sequence[tuple[str, float]]) -> str:
    if len(ranked) == 1:
        label, prob = ranked[0]
        return f"{path}\t{label}\t{prob:.4f}"
    return "\t".join([path, *(f"{label}:{prob:.4f}" for label, prob in ranked)])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        prog="python -m mmjax.tools.classify", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workdir", required=True, help="training workdir (config.json, ...)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint (default: latest)")
    parser.add_argument("--classes", required=True, help="class names, one per line")
    parser.add_argument("--templates", default=None, help="prompts with {} (default: {})")
    parser.add_argument("-k", type=int, default=1, help="how many classes to print per image")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    with log.to_stderr():  # Standard output holds the predictions.
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    try:
        if args.k < 1:
            raise ValueError(f"-k {args.k} must be >= 1")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size={args.batch_size} must be >= 1")
        classes = read_classes(args.classes)
        templates = read_templates(args.templates)
    except OSError as e:
        print(f"error: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = unreadable_files(args.images)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        predictor = Predictor.from_workdir(args.workdir, args.step)
        results = predictor.classify(
            args.images, classes, templates, top_k=args.k, batch_size=args.batch_size
        )
    except (BadImage, FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, ranked in zip(args.images, results):
        print(format_line(path, ranked))
    return 0


if __name__ == "__main__":
    sys.exit(main())

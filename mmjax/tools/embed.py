"""Image and text embeddings of any run or converted model, as one .npz file.

  mmjax embed --workdir runs/coca_tiny --images photos/ --texts captions.txt --out emb.npz
  mmjax embed --workdir runs/my_coca --images a.jpg b.png --out emb.npz [--step N]

OUT.npz holds `image_emb` [N, D] and `text_emb` [M, D] (float32, L2-normalised, in input
order: image files as given, a folder's images by name, for a video model a folder is a
clip; texts one a line of the file),
`logit_scale` (the learnt inverse temperature, capped as in training) and, for a sigmoid
(SigLIP) run, `logit_bias`; plus `images` and `texts`, what each row embeds. Images get the
evaluation transform (centre square, resized to the model's resolution); an image already
at that resolution is only normalised. Batched and sharded like the evaluators, with a
progress bar. An unreadable input stops the command in one line, exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmjax.inference.predictor import BadImage, Predictor, unreadable_files
from mmjax.runtime import cli, log, paths
from mmjax.runtime.checkpoint import CheckpointError
from mmjax.runtime.config import from_json_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_files(inputs: Sequence[str], video: bool = False) -> list[str]:
    """The image files named, a folder replaced by its images in name order (for a video
    model a folder is one clip, its frames, and stays as it is)."""
    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir() and not video:
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"--images {item}: no image files in this folder")
            files += [str(p) for p in found]
        else:
            files.append(item)
    return files


def read_texts(path: str) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"--texts {path}: no texts (one a line)")
    return texts


def embed(workdir, images: list[str], texts: list[str], step=None, batch_size=64) -> dict:
    """The arrays of OUT.npz (see the module doc)."""
    predictor = Predictor.from_workdir(workdir, step)
    config = from_json_file(paths.run_dir(workdir) / "config.json")
    dim = predictor.embed_dim
    out = {
        "image_emb": predictor.embed_images(images, batch_size, progress=True)
        if images
        else np.zeros((0, dim), np.float32),
        "text_emb": predictor.embed_texts(texts) if texts else np.zeros((0, dim), np.float32),
        "logit_scale": np.float32(predictor.logit_scale),
        "images": np.asarray(images, dtype=str),
        "texts": np.asarray(texts, dtype=str),
    }
    if config.loss.get("contrastive", "softmax") == "sigmoid":
        out["logit_bias"] = np.asarray(predictor.params["logit_bias"], np.float32)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    with log.to_stderr():  # Standard output holds the one result line.
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = cli.ArgumentParser(prog="mmjax embed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a run or converted workdir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint (default: newest)")
    parser.add_argument("--images", nargs="+", default=[], metavar="FILE|DIR")
    parser.add_argument("--texts", default=None, help="a text file, one text a line")
    parser.add_argument("--out", required=True, help="the .npz file to write")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        if not args.images and not args.texts:
            raise ValueError("nothing to embed: give --images and/or --texts")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size={args.batch_size} must be >= 1")
        config = from_json_file(paths.run_dir(args.workdir) / "config.json")
        images = image_files(args.images, config.model.get("input_kind") == "video")
        problem = unreadable_files(images)
        if problem:
            raise ValueError(problem)
        texts = read_texts(args.texts) if args.texts else []
        arrays = embed(args.workdir, images, texts, args.step, args.batch_size)
    except OSError as e:
        print(f"error: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except (BadImage, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    print(
        f"wrote {out}: {len(images)} images, {len(texts)} texts, "
        f"{arrays['image_emb'].shape[1]}-d embeddings"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Text-to-image search over a folder of images: a resumable embedding index, then queries.

  python -m mmjax.tools.search index --workdir runs/coca_tiny photos/ --out photos.index
  python -m mmjax.tools.search query photos.index "a red circle on the left" -k 10 --html hits.html

`index` embeds every image under IMAGE_DIR (recursive; .jpg .jpeg .png .webp .bmp .gif,
sorted) and writes INDEX/ as a `manifest.json` plus `embeddings-NNNNN.npy` chunks
(float32 [n, E], unit rows). Each chunk, then the manifest listing it with its image paths,
is written atomically, so an interrupted run keeps every finished chunk: rerunning the same
command embeds only the rest. The manifest records the model (workdir, step, embedding
size) and the image root; resuming with another model or image folder is refused unless
--overwrite. Unreadable images are skipped, counted and listed in the manifest (a rerun
does not retry them; --overwrite does).

`query` prints one line per match, best first: `rank<TAB>score<TAB>path` (rank from 1,
score = cosine similarity with 4 decimals). The text is embedded with the index's model
(the recorded workdir and step, unless --workdir). --html writes a self-contained page
with the hits as embedded JPEG thumbnails.

Python: `build_index(predictor, image_dir, out)`, `SearchIndex.load(out).query(text_emb, k)`
(many queries at once, in row blocks, so a 1M-image index never needs a full sort).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mmjax import storage
from mmjax.inference.predictor import Predictor
from mmjax.runtime import cli, log
from mmjax.runtime.checkpoint import CheckpointError

FORMAT = "mmjax-search-index"
VERSION = 1
MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
CHUNK_PATTERN = re.compile(r"embeddings-(\d{5,})\.npy")
THUMBNAIL_SIZE = 160
# Scores of one block of index rows for all queries stay under this many floats (64 MiB).
_BLOCK_ELEMENTS = 1 << 24


class SearchIndexError(ValueError):
    """An index that cannot be built, resumed or read (one-line message)."""


def list_images(root: str | os.PathLike) -> list[str]:
    """Image files under `root` by extension, as sorted POSIX paths relative to it."""
    root = Path(root)
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((Path(folder) / name).relative_to(root).as_posix())
    return sorted(found)


def _write_atomically(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_manifest(out: Path, manifest: dict) -> None:
    data = json.dumps(manifest, separators=(",", ":")).encode()
    _write_atomically(out / MANIFEST, lambda f: f.write(data))


def _read_manifest(out: Path) -> dict:
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SearchIndexError(f"{out / MANIFEST} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SearchIndexError(f"{out / MANIFEST} is not an mmjax search index manifest")
    if manifest.get("version") != VERSION:
        raise SearchIndexError(
            f"{out / MANIFEST} has version {manifest.get('version')}; this code reads {VERSION}"
        )
    return manifest


def _load_chunk(out: Path, chunk: dict, dim: int) -> np.ndarray:
    """A chunk's embeddings; raises SearchIndexError if missing or of the wrong shape."""
    path = out / chunk["file"]
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SearchIndexError(f"chunk {path} is unreadable: {e}") from None
    want = (len(chunk["paths"]), dim)
    if array.dtype != np.float32 or array.shape != want:
        raise SearchIndexError(f"chunk {path} holds {array.dtype} {array.shape}; expected {want}")
    return array


@dataclass
class BuildSummary:
    total: int  # images under the root
    embedded: int  # by this run
    reused: int  # already in the index (embedded or skipped by an earlier run)
    skipped: list[dict]  # {"path", "reason"} of the images this run could not read
    repaired: list[str]  # chunk files that were missing or damaged, their images redone


def _model_id(predictor) -> dict:
    return dict(
        workdir=str(predictor.workdir) if predictor.workdir is not None else None,
        step=predictor.step,
        embed_dim=predictor.embed_dim,
    )


def _resume(out: Path, fresh: dict, overwrite: bool) -> dict:
    """The manifest to continue from: the existing one if it matches, else a fresh one."""
    if out.exists() and not out.is_dir():
        raise SearchIndexError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    ours = lambda name: name == MANIFEST or CHUNK_PATTERN.fullmatch(name) or name.startswith(".")
    foreign = sorted(name for name in os.listdir(out) if not ours(name))
    if foreign:
        raise SearchIndexError(
            f"--out {out} holds files that are not an index's ({foreign[0]}, ...)"
        )
    if overwrite:
        for name in os.listdir(out):
            if ours(name) and (out / name).is_file():
                (out / name).unlink()
    if not (out / MANIFEST).exists():
        return fresh
    manifest = _read_manifest(out)
    for key, what in (
        ("workdir", "model workdir"),
        ("step", "checkpoint step"),
        ("embed_dim", "embedding size"),
        ("image_root", "image folder"),
    ):
        if manifest.get(key) != fresh[key]:
            raise SearchIndexError(
                f"index {out} was built with {what} {manifest.get(key)!r}, not {fresh[key]!r}; "
                f"pass --overwrite to rebuild it"
            )
    return manifest


def build_index(
    predictor,
    image_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    batch_size: int = 64,
    chunk_size: int = 8192,
    overwrite: bool = False,
    progress: bool = True,
    warn: Callable[[str], None] = log.warning,
) -> BuildSummary:
    """Embeds the images under `image_dir` into the index folder `out` (see the module doc).

    `predictor`: a `mmjax.inference.predictor.Predictor`. Raises SearchIndexError when the
    folder has no images or `out` belongs to another model or folder (unless `overwrite`).
    """
    from tqdm import tqdm

    if chunk_size < 1:
        raise SearchIndexError(f"chunk_size={chunk_size} must be >= 1")
    root = Path(image_dir)
    if not root.is_dir():
        raise SearchIndexError(f"image folder {root} is not a directory")
    root = root.resolve()
    out = Path(out)
    fresh = dict(
        format=FORMAT,
        version=VERSION,
        **_model_id(predictor),
        image_root=str(root),
        complete=False,
        chunks=[],
        skipped=[],
    )
    paths = list_images(root)
    if not paths:
        raise SearchIndexError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    manifest = _resume(out, fresh, overwrite)

    # Chunks whose file is gone or damaged are dropped; their images are embedded again.
    kept, repaired = [], []
    for chunk in manifest["chunks"]:
        try:
            _load_chunk(out, chunk, manifest["embed_dim"])
            kept.append(chunk)
        except SearchIndexError as e:
            warn(f"{e}; embedding its {len(chunk['paths'])} images again")
            repaired.append(chunk["file"])
    manifest["chunks"] = kept
    done = {p for chunk in kept for p in chunk["paths"]}
    done.update(entry["path"] for entry in manifest["skipped"])
    todo = [p for p in paths if p not in done]
    reused = len(paths) - len(todo)
    numbers = [int(CHUNK_PATTERN.fullmatch(c["file"]).group(1)) for c in kept]
    next_number = max(numbers, default=-1) + 1

    pending_paths: list[str] = []
    pending: list[np.ndarray] = []
    skipped: list[dict] = []

    def flush(count: int) -> None:
        """Writes the first `count` pending embeddings as the next chunk."""
        nonlocal next_number, pending_paths, pending
        name = f"embeddings-{next_number:05d}.npy"
        rows = np.concatenate(pending)
        array = np.ascontiguousarray(rows[:count], dtype=np.float32)
        _write_atomically(out / name, lambda f: np.save(f, array, allow_pickle=False))
        manifest["chunks"].append(dict(file=name, paths=pending_paths[:count]))
        _write_manifest(out, manifest)  # Only now does the chunk count as done.
        next_number += 1
        pending_paths, pending = pending_paths[count:], [rows[count:]]

    bar = tqdm(total=len(paths), initial=reused, desc="index", unit="img", disable=not progress)
    with bar:
        batches = predictor.embed_image_batches([str(root / p) for p in todo], batch_size)
        for batch, embeddings in batches:
            for position, error in batch.bad:
                entry = dict(path=todo[position], reason=error.reason)
                skipped.append(entry)
                manifest["skipped"].append(entry)
            pending_paths.extend(todo[p] for p in batch.positions)
            pending.append(embeddings)
            bar.update(len(batch.positions) + len(batch.bad))
            while len(pending_paths) >= chunk_size:  # Chunks hold chunk_size images each.
                flush(chunk_size)
    if pending_paths:
        flush(len(pending_paths))
    manifest["complete"] = True
    _write_manifest(out, manifest)
    listed = {c["file"] for c in manifest["chunks"]}
    for name in os.listdir(out):  # Chunks of an interrupted run that no manifest lists.
        if CHUNK_PATTERN.fullmatch(name) and name not in listed:
            (out / name).unlink()
    return BuildSummary(len(paths), len(todo) - len(skipped), reused, skipped, repaired)


def top_k(
    embeddings: np.ndarray, queries: np.ndarray, k: int, block: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], indices [Q, k]) of the k largest dot products, best first.

    Works through `embeddings` in row blocks, keeping each query's best k so far
    (np.argpartition), so memory is O(Q * block) and nothing is fully sorted but the k.
    """
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    count, num_queries = len(embeddings), len(queries)
    k = min(int(k), count)
    if k < 1:
        empty = np.zeros((num_queries, 0))
        return empty.astype(np.float32), empty.astype(np.int64)
    block = block or max(1024, _BLOCK_ELEMENTS // max(1, num_queries))
    best_scores = np.zeros((num_queries, 0), np.float32)
    best_index = np.zeros((num_queries, 0), np.int64)
    for start in range(0, count, block):
        scores = queries @ np.asarray(embeddings[start : start + block], np.float32).T
        take = min(k, scores.shape[1])
        # The largest `take` land at the end; no negated copy of the scores.
        local = np.argpartition(scores, scores.shape[1] - take, axis=1)[:, -take:]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, local, 1)], 1)
        best_index = np.concatenate([best_index, local + start], 1)
        if best_scores.shape[1] > k:
            keep = np.argpartition(best_scores, best_scores.shape[1] - k, axis=1)[:, -k:]
            best_scores = np.take_along_axis(best_scores, keep, 1)
            best_index = np.take_along_axis(best_index, keep, 1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_scores, order, 1), np.take_along_axis(best_index, order, 1)


class SearchIndex:
    """Embeddings [N, E] of images and their paths, as `build_index` wrote them."""

    def __init__(self, embeddings: np.ndarray, paths: Sequence[str], manifest: dict | None = None):
        if len(embeddings) != len(paths):
            raise SearchIndexError(f"{len(embeddings)} embeddings for {len(paths)} paths")
        self.embeddings = np.asarray(embeddings, np.float32)
        self.paths = list(paths)
        self.manifest = manifest or {}

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchIndex:
        """Reads INDEX/manifest.json and its chunks; paths become image_root/relative."""
        out = Path(path)
        if not (out / MANIFEST).is_file():
            raise SearchIndexError(f"{out} is not a search index (no {MANIFEST})")
        manifest = _read_manifest(out)
        dim = manifest["embed_dim"]
        chunks = [_load_chunk(out, chunk, dim) for chunk in manifest["chunks"]]
        root = Path(manifest["image_root"])
        paths = [str(root / p) for chunk in manifest["chunks"] for p in chunk["paths"]]
        embeddings = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
        return cls(embeddings, paths, manifest)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def __len__(self) -> int:
        return len(self.paths)

    def query(self, text_embeddings: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], indices [Q, k]) for text embeddings [Q, E] (or one [E])."""
        queries = np.atleast_2d(np.asarray(text_embeddings, np.float32))
        if queries.shape[1] != self.dim:
            raise SearchIndexError(
                f"query embeddings have size {queries.shape[1]}; the index holds {self.dim}"
            )
        return top_k(self.embeddings, queries, k)


def _thumbnail(path: str) -> str | None:
    """A base64 JPEG no larger than THUMBNAIL_SIZE (small images are enlarged to it)."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            scale = THUMBNAIL_SIZE / max(img.size)
            size = tuple(max(1, round(side * scale)) for side in img.size)
            # Enlarging tiny images: NEAREST keeps their pixels visible instead of a blur.
            method = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
            img = img.resize(size, method)
            data = io.BytesIO()
            img.save(data, format="JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return base64.b64encode(data.getvalue()).decode("ascii")


def write_html(
    out: str | os.PathLike, query: str, hits: Sequence[tuple[float, str]], note: str = ""
) -> None:
    """A self-contained page: the query and a grid of (thumbnail, rank, score, path)."""
    cells = []
    for rank, (score, path) in enumerate(hits, start=1):
        thumb = _thumbnail(path)
        picture = (
            f'<img src="data:image/jpeg;base64,{thumb}" alt="rank {rank}">'
            if thumb
            else '<div class="missing">unreadable</div>'
        )
        cells.append(
            f"<figure>{picture}<figcaption><b>#{rank}</b> {score:.4f}<br>"
            f'<span class="path">{html.escape(path)}</span></figcaption></figure>'
        )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(query)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: {THUMBNAIL_SIZE}px; }}
img, .missing {{ width: {THUMBNAIL_SIZE}px; height: {THUMBNAIL_SIZE}px; object-fit: contain;
  background: #eee; }}
.missing {{ display: flex; align-items: center; justify-content: center; color: #900; }}
.path {{ font-size: 11px; color: #555; word-break: break-all; }}
</style></head><body>
<h1>{html.escape(query)}</h1>
<p>{html.escape(note)}</p>
<div class="grid">
{chr(10).join(cells)}
</div></body></html>
"""
    data = page.encode("utf-8")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, lambda f: f.write(data))


# --- command line ------------------------------------------------------------------------


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _index_main(args) -> int:

    if args.batch_size < 1 or args.chunk_size < 1:
        return _error("--batch-size and --chunk-size must be >= 1")
    if not Path(args.image_dir).is_dir():
        return _error(f"image folder {args.image_dir} is not a directory")
    out = Path(args.out)
    workdir = str(storage.path(args.workdir))
    if (out / MANIFEST).is_file() and not args.overwrite:  # Refuse before loading a model.
        try:
            recorded = _read_manifest(out).get("workdir")
        except SearchIndexError as e:
            return _error(str(e))
        if recorded != workdir:
            return _error(
                f"index {out} was built with model workdir {recorded!r}, not {workdir!r}; "
                f"pass --overwrite to rebuild it"
            )
    try:
        predictor = Predictor.from_workdir(args.workdir, args.step)
        summary = build_index(
            predictor,
            args.image_dir,
            out,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            overwrite=args.overwrite,
        )
    except (SearchIndexError, FileNotFoundError, CheckpointError, ValueError) as e:
        return _error(str(e))
    for entry in summary.skipped[:10]:
        print(f"skipped {entry['path']}: {entry['reason']}", file=sys.stderr)
    print(
        f"index {out}: {summary.total} images ({summary.embedded} embedded now, "
        f"{summary.reused} already done); {len(summary.skipped)} unreadable skipped"
        + (f" (listed in {out / MANIFEST})" if summary.skipped else "")
        + f"; model {predictor.workdir} step {predictor.step}"
    )
    return 0


def _query_main(args) -> int:

    if args.k < 1:
        return _error(f"-k {args.k} must be >= 1")
    try:
        index = SearchIndex.load(args.index)
    except SearchIndexError as e:
        return _error(str(e))
    recorded, step = index.manifest.get("workdir"), index.manifest.get("step")
    workdir = args.workdir or recorded
    if workdir is None:
        return _error(f"index {args.index} records no model workdir; pass --workdir")
    if recorded is None or str(storage.path(workdir)) != str(storage.path(recorded)):
        step = None  # Another model: its latest checkpoint.
        log.warning(
            f"note: the index was built with {recorded} step {index.manifest.get('step')}"
            f"; querying with {workdir}"
        )
    if not index.manifest.get("complete", False):
        log.warning(f"note: index {args.index} is incomplete; rerun `index`")
    try:
        predictor = Predictor.from_workdir(workdir, step)
        scores, indices = index.query(predictor.embed_texts([args.text]), args.k)
    except (SearchIndexError, FileNotFoundError, CheckpointError, ValueError) as e:
        return _error(str(e))
    hits = [(float(s), index.paths[i]) for s, i in zip(scores[0], indices[0])]
    for rank, (score, path) in enumerate(hits, start=1):
        print(f"{rank}\t{score:.4f}\t{path}")
    if args.html:
        note = f"{len(index)} images; model {predictor.workdir} step {predictor.step}"
        write_html(args.html, args.text, hits, note)
        log.info(f"wrote {args.html}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    with log.to_stderr():  # Standard output holds the results.
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m mmjax.tools.search", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="embed the images under a folder (resumable)")
    index.add_argument("--workdir", required=True, help="training workdir")
    index.add_argument("--step", type=int, default=None, help="checkpoint (default: latest)")
    index.add_argument("image_dir", metavar="IMAGE_DIR")
    index.add_argument("--out", required=True, metavar="INDEX", help="index folder")
    index.add_argument("--batch-size", type=int, default=64)
    index.add_argument("--chunk-size", type=int, default=8192, help="images per chunk file")
    index.add_argument("--overwrite", action="store_true", help="rebuild an existing index")
    query = commands.add_parser("query", help="the images closest to a text")
    query.add_argument("index", metavar="INDEX")
    query.add_argument("text")
    query.add_argument("-k", type=int, default=10)
    query.add_argument("--workdir", default=None, help="default: the index's model")
    query.add_argument("--html", default=None, metavar="OUT.html")
    args = parser.parse_args(argv)
    return _index_main(args) if args.command == "index" else _query_main(args)


if __name__ == "__main__":
    sys.exit(main())

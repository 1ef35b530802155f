"""Search benchmark: image indexing throughput and text-query latency.

  python -m mmjax.benchmarks.search [--images 1024] [--size tiny] [--index-size 100000] [--dim 256]

Indexing: writes a folder of JPEGs of the shapes corpus (--image-px square), then times
`mmjax.tools.search.build_index` over it end to end (decode, resize, embed with a randomly
initialised model of --size, write the chunks), batch --batch-size. Compilation is done
before the clock starts and reported apart; the decode-only rate shows how much of the
time is the CPU side. Queries: top-k over --index-size random unit vectors of --dim (not
model embeddings: search cost depends only on the sizes), as the median over repeats of one
query and of a batch of --query-batch queries. Prints the figures; writes nothing that stays.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from mmjax.data.image_corpus import write_image_corpus
from mmjax.inference.predictor import Predictor, image_batches
from mmjax.models.config import SIZES, ModelConfig
from mmjax.runtime import cli
from mmjax.tools.search import SearchIndex, build_index, list_images


def _median_ms(fn, repeats: int) -> float:
    fn()  # Warm caches and any lazy allocation.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _unit_rows(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((count, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_indexing(args) -> dict[str, float]:
    cfg = ModelConfig.from_mapping(dict(SIZES[args.size], dtype=args.dtype))
    predictor = Predictor.from_init(cfg, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="mmjax_search_bench_") as tmp:
        write_image_corpus(tmp, num_examples=args.images, image_size=args.image_px, seed=1)
        folder = Path(tmp) / "images" / "train"
        paths = [str(folder / p) for p in list_images(folder)]

        start = time.perf_counter()
        predictor.embed_images(paths[: args.batch_size], batch_size=args.batch_size)
        compile_s = time.perf_counter() - start

        start = time.perf_counter()
        for _ in image_batches(paths, predictor.image_options, args.batch_size):
            pass
        decode_s = time.perf_counter() - start

        start = time.perf_counter()
        summary = build_index(
            predictor, folder, Path(tmp) / "index", batch_size=args.batch_size, progress=False
        )
        index_s = time.perf_counter() - start
    if summary.embedded != args.images:
        raise RuntimeError(f"indexed {summary.embedded} of {args.images} images")
    return dict(
        compile_s=compile_s,
        decode_rate=args.images / decode_s,
        index_rate=args.images / index_s,
        index_s=index_s,
        image_size=cfg.image_size,
        embed_dim=cfg.embed_dim,
    )


def bench_queries(args, dim: int) -> dict[str, float]:
    rng = np.random.default_rng(args.seed)
    index = SearchIndex(_unit_rows(rng, args.index_size, dim), [""] * args.index_size)
    queries = _unit_rows(rng, args.query_batch, dim)
    single = _median_ms(lambda: index.query(queries[0], args.k), args.repeats)
    batch = _median_ms(lambda: index.query(queries, args.k), max(3, args.repeats // 4))
    return dict(single_ms=single, batch_ms=batch)


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m mmjax.benchmarks.search", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--images", type=int, default=1024, help="JPEGs to index")
    parser.add_argument("--image-px", type=int, default=128, help="side of the JPEGs")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model size")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--index-size", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256, help="query bench embedding size")
    parser.add_argument("--query-batch", type=int, default=64)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("images", "batch_size", "index_size", "dim", "query_batch", "k", "repeats"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.image_px < 16:
        print("error: --image-px must be >= 16", file=sys.stderr)
        return 2

    device = jax.devices()[0]
    print(
        f"search bench: jax {jax.__version__}, {jax.device_count()} {device.platform} "
        f"device(s) ({device.device_kind}), {os.cpu_count()} CPU cores"
    )
    ix = bench_indexing(args)
    print(
        f"indexing: {args.images} JPEGs of {args.image_px}x{args.image_px} px -> "
        f"{args.size} model, random init ({args.dtype}; image {ix['image_size']} px, embed "
        f"{ix['embed_dim']}), batch {args.batch_size}"
    )
    print(f"  compile (not timed below)  {ix['compile_s']:.1f} s")
    print(f"  decode + resize only       {ix['decode_rate']:.0f} images/s")
    print(
        f"  index end to end           {ix['index_rate']:.0f} images/s "
        f"({args.images} images in {ix['index_s']:.2f} s, chunks written)"
    )
    q = bench_queries(args, args.dim)
    print(
        f"query: top-{args.k} over {args.index_size} x {args.dim} random unit vectors "
        f"(not model embeddings), float32 on the host"
    )
    print(f"  1 query                    median {q['single_ms']:.2f} ms")
    print(
        f"  {args.query_batch} queries                 median {q['batch_ms']:.2f} ms per batch "
        f"({q['batch_ms'] / args.query_batch:.3f} ms per query)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

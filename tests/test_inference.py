"""Inference: the Predictor API, the caption / classify / search commands, zero-shot helpers.

  .venv/bin/python -m pytest tests/test_inference.py -p no:xdist

The slow tests read the shared `learned` run (tests/runs.py: the tiny CoCa after 800 steps
on the shapes corpus) and feed it images rendered here from the held-out split, whose true
captions are known. The fast tests need no model: zero-shot file parsing and prompt
ensembling, top-k search against a brute-force sort, and index building / resuming with a
stand-in predictor that embeds an image as its mean colour.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmjax.data.preprocess import ImageOptions
from mmjax.data.shapes import COLOURS, SHAPES, ShapesSource
from mmjax.inference.predictor import BadImage, image_batches, padded_rows, read_image
from mmjax.inference.prompts import class_embeddings, read_classes, read_templates
from mmjax.tools.search import (
    MANIFEST,
    SearchIndex,
    SearchIndexError,
    build_index,
    list_images,
    top_k,
    write_html,
)
from tests.runs import REPO, env_for, run

SLOW_TESTS = (
    "test_caption_cli_captions_in_input_order",
    "test_caption_cli_sampling_flags_reach_the_decoder",
    "test_caption_cli_bad_images_exit_2",
    "test_predictor_batches_pad_and_compile_once",
    "test_predictor_decoding_options",
    "test_search_cli_finds_the_planted_image_and_resumes",
    "test_classify_cli",
    "test_sharded_predictor_matches_one_device",
)
NEEDS = {name: ("learned",) for name in SLOW_TESTS}

SHAPES_CLASSES = REPO / "configs/zeroshot/shapes_shapes.txt"
SHAPES_TEMPLATES = REPO / "configs/zeroshot/shapes_shape_templates.txt"
NUM_IMAGES = 12
PLANTED = dict(size="large", colour="red", shape="circle", position="left")
PLANTED_CAPTION = "a large red circle on the left"


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learned(runs):
    workdir, _ = runs.get("learned")
    return workdir


def _held_out(count: int, keep) -> list[tuple[dict, np.ndarray, str]]:
    """(attributes, image, caption) of the first `count` held-out examples `keep` accepts."""
    source = ShapesSource("eval", 5000, seed=0, image_size=32)
    picked = []
    for i in range(len(source)):
        if keep(source.attributes(i)):
            example = source[i]
            picked.append((source.attributes(i), example["image"], example["caption"]))
            if len(picked) == count:
                return picked
    raise AssertionError("not enough matching examples")


@pytest.fixture(scope="module")
def large_images(tmp_path_factory):
    """12 held-out large shapes as PNG files: [(path, attributes, caption)].

    Large only: a small shape is about 5 pixels wide at 32 px, where the tiny model often
    names the wrong shape (its colour and position are still right).
    """
    folder = tmp_path_factory.mktemp("large_images")
    out = []
    for n, (attributes, image, caption) in enumerate(
        _held_out(NUM_IMAGES, lambda a: a["size"] == "large")
    ):
        path = folder / f"image_{n:02d}.png"
        Image.fromarray(image).save(path)
        out.append((str(path), attributes, caption))
    return out


@pytest.fixture(scope="module")
def predictor(learned):
    from mmjax.inference.predictor import Predictor

    return Predictor.from_workdir(learned)


def _cli(module, args, cache_dir, **kw):
    return run(module, args, cache_dir, check=False, **kw)


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --- zero-shot files and prompt ensembling (no model) --------------------------------------


def test_read_classes_skips_comments_and_rejects_duplicates(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# header\n\ncircle\n  square  \n# note\ntriangle\n")
    assert read_classes(path) == ["circle", "square", "triangle"]
    path.write_text("circle\nsquare\n\ncircle\n")
    with pytest.raises(ValueError, match=r"classes.txt:4: class 'circle' repeats line 1"):
        read_classes(path)
    path.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="no class names"):
        read_classes(path)


def test_read_templates_needs_one_placeholder_per_line(tmp_path):
    assert read_templates(None) == ["{}"]
    path = tmp_path / "templates.txt"
    path.write_text("# prompts\na photo of a {}\n\na {} in the center\n")
    assert read_templates(path) == ["a photo of a {}", "a {} in the center"]
    for bad, line in (("a {}\na photo\n", 2), ("a {} and a {}\n", 1), ("# x\na {} {0}\n", 2)):
        path.write_text(bad)
        with pytest.raises(ValueError, match=rf"templates.txt:{line}: template"):
            read_templates(path)


def test_shipped_shapes_files_cover_the_corpus():
    assert read_classes(SHAPES_CLASSES) == list(SHAPES)
    templates = read_templates(SHAPES_TEMPLATES)
    assert len(templates) >= 6
    # Written in the corpus's caption grammar: every one names a colour and a size.
    for template in templates:
        words = template.split()
        assert words[1] in ("small", "large") and words[2] in COLOURS, template


def test_class_embeddings_normalise_before_and_after_the_template_mean():
    vectors = {
        "x cat": [3.0, 0.0, 0.0],  # Different norms: the first normalisation matters.
        "y cat": [0.0, 4.0, 0.0],
        "x dog": [0.0, 0.0, 2.0],
        "y dog": [0.0, 0.0, 5.0],
    }
    calls = []

    def embed_texts(texts):
        calls.append(list(texts))
        return np.asarray([vectors[t] for t in texts])

    out = class_embeddings(embed_texts, ["cat", "dog"], ["x {}", "y {}"])
    assert out.dtype == np.float32 and out.shape == (2, 3)
    # cat: mean of the unit vectors e0, e1 -> (1, 1, 0) / sqrt(2); the mean of the raw
    # vectors would give (0.6, 0.8, 0).
    np.testing.assert_allclose(out[0], [2**-0.5, 2**-0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(out[1], [0.0, 0.0, 1.0], atol=1e-6)
    assert calls == [["x cat", "y cat", "x dog", "y dog"]]  # One batched call.


# --- search: top-k, HTML, index building with a stand-in model (no model) ------------------


def test_top_k_matches_a_brute_force_sort():
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((5000, 32)).astype(np.float32)
    queries = rng.standard_normal((7, 32)).astype(np.float32)
    scores, indices = top_k(embeddings, queries, 10, block=512)  # Ten blocks.
    full = queries @ embeddings.T
    expected = np.argsort(-full, axis=1)[:, :10]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, 1), rtol=1e-5)
    # More than the index holds: all of it, sorted; one 1-D query through SearchIndex.
    index = SearchIndex(embeddings[:3], ["a", "b", "c"])
    scores, indices = index.query(queries[0], k=10)
    assert indices.shape == (1, 3)
    np.testing.assert_array_equal(indices[0], np.argsort(-(embeddings[:3] @ queries[0])))
    with pytest.raises(SearchIndexError, match="size 5"):
        index.query(np.zeros(5), k=1)


def test_list_images_is_recursive_sorted_and_by_extension(tmp_path):
    for name in ("b.JPG", "a.png", "sub/c.webp", "sub/deeper/d.gif", "notes.txt", "e.jpeg.bak"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert list_images(tmp_path) == ["a.png", "b.JPG", "sub/c.webp", "sub/deeper/d.gif"]


def test_html_page_embeds_thumbnails_and_escapes_paths(tmp_path):
    good = tmp_path / "a&b.png"
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(good)
    out = tmp_path / "page.html"
    hits = [(0.91, str(good)), (0.5, str(tmp_path / "gone.jpg"))]
    write_html(out, "a <red> circle", hits)
    page = out.read_text()
    assert page.count("<img") == 1 and page.count('class="missing"') == 1
    assert "a &lt;red&gt; circle" in page and "a&amp;b.png" in page and "0.9100" in page
    assert "data:image/jpeg;base64," in page  # Self-contained: no file links.


class MeanColourPredictor:
    """Stands in for Predictor in build_index: an image's embedding is its mean colour."""

    def __init__(self, workdir="/runs/fake", step=1):
        self.workdir, self.step, self.embed_dim = Path(workdir), step, 3
        self.options = ImageOptions(image_size=16, train=False)
        self.embedded: list[str] = []

    def embed_image_batches(self, images, batch_size=64):
        for batch in image_batches(images, self.options, batch_size):
            self.embedded.extend(images[p] for p in batch.positions)
            means = batch.images.mean(axis=(1, 2)) + 1.0
            yield batch, (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def colour_folder(tmp_path):
    """Seven solid-colour images (one in a subfolder, one a JPEG) and one corrupt file."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    colours = {}
    for i in range(7):
        name = f"sub/{i}.png" if i == 3 else f"{i}.jpg" if i == 5 else f"{i}.png"
        colour = (30 * i, 255 - 30 * i, (70 * i) % 256)
        Image.fromarray(np.full((24, 24, 3), colour, np.uint8)).save(root / name, quality=100)
        colours[name] = colour
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    return root, colours


def test_build_index_skips_bad_images_and_resumes(tmp_path, colour_folder):
    root, colours = colour_folder
    out = tmp_path / "index"
    first = MeanColourPredictor()
    summary = build_index(first, root, out, batch_size=3, chunk_size=2, progress=False)
    assert (summary.total, summary.embedded, summary.reused) == (8, 7, 0)
    assert [s["path"] for s in summary.skipped] == ["broken.png"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["skipped"][0]["path"] == "broken.png"
    assert [len(c["paths"]) for c in manifest["chunks"]] == [2, 2, 2, 1]
    index = SearchIndex.load(out)
    assert sorted(index.paths) == sorted(str(root.resolve() / name) for name in colours)
    # Each row is its own image's embedding (a colour query finds that image first).
    for name, colour in colours.items():
        query = np.asarray(colour, np.float32) + 1.0
        _, best = index.query(query / np.linalg.norm(query), k=1)
        assert index.paths[best[0, 0]].endswith(name), name
    before = index.embeddings.copy()

    # An interruption after the first chunk, and a damaged second chunk: the rerun embeds
    # exactly the images of the missing chunks; the broken image is not retried.
    chunks = manifest["chunks"]
    manifest["chunks"], manifest["complete"] = chunks[:2], False
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / chunks[1]["file"]).write_bytes(b"not an npy file")
    warnings = []
    second = MeanColourPredictor()
    summary = build_index(second, root, out, chunk_size=2, progress=False, warn=warnings.append)
    redone = [Path(p).relative_to(root.resolve()).as_posix() for p in second.embedded]
    assert redone == [p for chunk in chunks[1:] for p in chunk["paths"]]
    assert (summary.embedded, summary.reused) == (5, 3) and len(warnings) == 1
    resumed = SearchIndex.load(out)
    order = [resumed.paths.index(p) for p in index.paths]
    np.testing.assert_allclose(resumed.embeddings[order], before, atol=1e-6)
    assert len(list(out.glob("embeddings-*.npy"))) == len(resumed.manifest["chunks"])

    # Nothing left to do: nothing embedded.
    third = MeanColourPredictor()
    assert build_index(third, root, out, progress=False).embedded == 0 and not third.embedded


def test_build_index_refuses_another_model_unless_overwrite(tmp_path, colour_folder):
    root, colours = colour_folder
    out = tmp_path / "index"
    build_index(MeanColourPredictor(step=1), root, out, progress=False)
    with pytest.raises(SearchIndexError, match=r"checkpoint step 1, not 2; pass --overwrite"):
        build_index(MeanColourPredictor(step=2), root, out, progress=False)
    with pytest.raises(SearchIndexError, match="model workdir"):
        build_index(MeanColourPredictor(workdir="/runs/other"), root, out, progress=False)
    newer = MeanColourPredictor(step=2)
    build_index(newer, root, out, overwrite=True, progress=False)
    assert len(newer.embedded) == len(colours)
    assert SearchIndex.load(out).manifest["step"] == 2
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "thesis.tex").write_text("keep me")
    with pytest.raises(SearchIndexError, match="not an index's"):
        build_index(MeanColourPredictor(), root, tmp_path / "elsewhere", progress=False)
    assert (tmp_path / "elsewhere" / "thesis.tex").read_text() == "keep me"


def test_read_image_names_the_bad_input(tmp_path):
    options = ImageOptions(image_size=16, train=False)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(BadImage, match=r"cannot read image .*bad.jpg: corrupt_image"):
        read_image(str(bad), options)
    with pytest.raises(BadImage, match="missing.png"):
        read_image(tmp_path / "missing.png", options)
    with pytest.raises(BadImage, match=r"image #4 \(in memory\): .*uint8"):
        read_image(np.zeros((8, 8, 3), np.float32), options, position=4)
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 6:34] = 255  # The centre square (columns 10-29) and a margin are white.
    assert read_image(wide, options).min() == 255


def test_padded_rows():
    assert padded_rows(6, 64, 1) == 8
    assert padded_rows(70, 64, 1) == 64  # Every batch of a long call: one shape.
    assert padded_rows(64, 64, 1) == 64
    assert padded_rows(3, 64, 8) == 8
    assert padded_rows(20, 64, 8) == 32
    assert padded_rows(1, 5, 4) == 4 and padded_rows(9, 5, 4) == 8  # Multiples of 4.


# --- the trained model ---------------------------------------------------------------------


@pytest.mark.slow
def test_caption_cli_captions_in_input_order(learned, large_images, cache_dir):
    shuffled = [large_images[i] for i in np.random.default_rng(0).permutation(NUM_IMAGES)]
    proc = run("mmjax.tools.caption", ["--workdir", learned, *(p for p, _, _ in shuffled)], cache_dir)
    lines = proc.stdout.splitlines()
    assert len(lines) == NUM_IMAGES, proc.stdout
    exact = 0
    for line, (path, attributes, caption) in zip(lines, shuffled):
        got_path, got = line.split("\t")
        assert got_path == path
        words = got.split()
        # Colour is never wrong for this model; a mismatch means a line of another image.
        assert attributes["colour"] in words, (line, caption)
        exact += got == caption
    # The shape is the hard part (~74% exact on large shapes; >= 6 in every run of 12).
    assert exact >= NUM_IMAGES // 2, proc.stdout


@pytest.mark.slow
def test_caption_cli_sampling_flags_reach_the_decoder(learned, large_images, cache_dir, predictor):
    paths = [p for p, _, _ in large_images[:4]]
    # A temperature of 50 is almost uniform: unlike greedy (sampling itself, seeds and top-k
    # are checked in-process by test_predictor_decoding_options and tests/test_generate.py).
    hot = ["--method", "sample", "--temperature", "50", "--seed", "3"]
    lines = run("mmjax.tools.caption", ["--workdir", learned, *hot, *paths], cache_dir).stdout
    captions = [line.split("\t")[1] for line in lines.splitlines()]
    assert len(captions) == 4 and captions != predictor.caption(paths)


@pytest.mark.slow
def test_caption_cli_bad_images_exit_2(learned, large_images, tmp_path, cache_dir):
    good = large_images[0][0]
    missing = tmp_path / "missing.png"
    _one_line_error(
        _cli("mmjax.tools.caption", ["--workdir", learned, good, missing], cache_dir), str(missing)
    )
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 64)
    proc = _cli("mmjax.tools.caption", ["--workdir", learned, good, corrupt], cache_dir)
    # The good image is still captioned; the bad one has its line, and the last line counts.
    assert proc.returncode == 2 and proc.stdout.startswith(f"{good}\t")
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: cannot read image {corrupt}: corrupt_image")
    assert lines[1:] == [
        f"error: 1 of 2 images could not be read ({corrupt}); the others are captioned"
    ]
    _one_line_error(
        _cli("mmjax.tools.caption", ["--workdir", tmp_path, good], cache_dir), "has no config.json"
    )
    proc = _cli("mmjax.tools.caption", ["--workdir", learned, "--top-p", "2", good], cache_dir)
    _one_line_error(proc, "top_p=2.0")


@pytest.mark.slow
def test_predictor_batches_pad_and_compile_once(predictor, large_images):
    images = [image for _, image, _ in _held_out(70, lambda a: True)]
    compiled = predictor.functions.embed_images._cache_size()
    batched = predictor.embed_images(images, batch_size=64)  # 64 + 6 padded to 64.
    assert predictor.functions.embed_images._cache_size() == compiled + 1
    assert batched.shape == (70, predictor.embed_dim) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([predictor.embed_images([image]) for image in images[:5]])
    np.testing.assert_allclose(one_by_one, batched[:5], atol=1e-5)
    # Paths decode like the arrays they were written from (PNG is lossless).
    paths = [p for p, _, _ in large_images[:3]]
    from_files = predictor.embed_images(paths)
    arrays = [np.asarray(Image.open(p)) for p in paths]
    np.testing.assert_allclose(from_files, predictor.embed_images(arrays), atol=1e-6)
    with pytest.raises(BadImage, match="nowhere.png"):
        predictor.embed_images([paths[0], "/nowhere.png"])


@pytest.mark.slow
def test_predictor_decoding_options(predictor, large_images):
    from mmjax.inference.generate import GenerateOptions

    paths = [p for p, _, _ in large_images]
    truth = [caption for _, _, caption in large_images]
    beam = predictor.caption(paths, GenerateOptions(method="beam", beam_size=3))
    assert sum(a == b for a, b in zip(beam, truth)) >= NUM_IMAGES // 2, beam
    hot = GenerateOptions(method="sample", temperature=50.0)
    first = predictor.caption(paths[:4], hot, seed=1)
    assert predictor.caption(paths[:4], hot, seed=1) == first  # The seed fixes sampling.
    assert predictor.caption(paths[:4], hot, seed=2) != first
    # Zero-shot on colours, which this model knows: probabilities per image sum to 1.
    colours = list(COLOURS)
    ranked = predictor.classify(paths, colours, ["a large {} circle in the center"], top_k=8)
    for result in ranked:
        assert sorted(label for label, _ in result) == sorted(colours)
        assert sum(p for _, p in result) == pytest.approx(1.0, abs=1e-4)
        assert [p for _, p in result] == sorted((p for _, p in result), reverse=True)
    hits = sum(r[0][0] == a["colour"] for r, (_, a, _) in zip(ranked, large_images))
    assert hits >= 0.8 * NUM_IMAGES


@pytest.mark.slow
def test_classify_cli(learned, large_images, tmp_path, cache_dir, predictor):
    paths = [p for p, _, _ in large_images]
    classes, templates = tmp_path / "colours.txt", tmp_path / "templates.txt"
    classes.write_text("\n".join(COLOURS) + "\n")
    templates.write_text(
        "a large {} circle in the center\na large {} square on the left\n"
        "a large {} triangle at the top right\na large {} cross at the bottom\n"
    )
    args = ["--workdir", learned, "--classes", classes, "--templates", templates, *paths]
    lines = run("mmjax.tools.classify", args, cache_dir).stdout.splitlines()
    assert len(lines) == NUM_IMAGES
    correct = 0
    for line, (path, attributes, _) in zip(lines, large_images):
        got_path, label, prob = line.split("\t")
        assert got_path == path and label in COLOURS and 0 < float(prob) <= 1
        correct += label == attributes["colour"]
    assert correct >= 0.8 * NUM_IMAGES, lines

    # The shipped shapes task, top 4 of 4: every class once, the API's probabilities.
    args = ["--workdir", learned, "--classes", SHAPES_CLASSES, "--templates", SHAPES_TEMPLATES]
    lines = run("mmjax.tools.classify", [*args, "-k", "4", *paths], cache_dir).stdout.splitlines()
    expected = predictor.classify(
        paths, read_classes(SHAPES_CLASSES), read_templates(SHAPES_TEMPLATES), top_k=4
    )
    assert len(lines) == NUM_IMAGES
    for line, path, ranked in zip(lines, paths, expected):
        fields = line.split("\t")
        assert fields[0] == path and len(fields) == 5
        pairs = [field.rsplit(":", 1) for field in fields[1:]]
        assert sorted(label for label, _ in pairs) == sorted(SHAPES)
        assert sum(float(p) for _, p in pairs) == pytest.approx(1.0, abs=1e-3)
        assert [label for label, _ in pairs] == [label for label, _ in ranked]
        np.testing.assert_allclose([float(p) for _, p in pairs], [p for _, p in ranked], atol=2e-4)
    bad = tmp_path / "dupes.txt"
    bad.write_text("circle\ncircle\n")
    proc = _cli("mmjax.tools.classify", ["--workdir", learned, "--classes", bad, paths[0]], cache_dir)
    _one_line_error(proc, "dupes.txt:2")


@pytest.fixture(scope="module")
def planted_folder(tmp_path_factory):
    """23 held-out images with no red shape on the left, one large red circle on the left
    (planted.jpg), and a corrupt file. Red elsewhere and other colours on the left are in:
    only the colour and the position together single out the planted image."""
    root = tmp_path_factory.mktemp("planted")
    (root / "more").mkdir()
    others = _held_out(23, lambda a: not (a["colour"] == "red" and a["position"] == "left"))
    assert any(a["colour"] == "red" for a, _, _ in others)
    assert any(a["position"] == "left" for a, _, _ in others)
    for n, (_, image, _) in enumerate(others):
        name = f"more/{n:02d}.png" if n % 3 == 0 else f"{n:02d}.png"
        Image.fromarray(image).save(root / name)
    [(_, image, caption)] = _held_out(1, lambda a: a == PLANTED)
    assert caption == PLANTED_CAPTION
    Image.fromarray(image).save(root / "planted.jpg", quality=95)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 64)
    return root


@pytest.mark.slow
def test_search_cli_finds_the_planted_image_and_resumes(
    learned, planted_folder, tmp_path, cache_dir
):
    out = tmp_path / "index"
    index_args = ["index", "--workdir", learned, planted_folder, "--out", out]
    proc = run("mmjax.tools.search", [*index_args, "--batch-size", "8", "--chunk-size", "8"], cache_dir)
    assert "24 embedded now" in proc.stdout and "1 unreadable skipped" in proc.stdout, proc
    assert "broken.jpg" in proc.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert len(manifest["chunks"]) == 3 and manifest["step"] == 800
    assert [s["path"] for s in manifest["skipped"]] == ["broken.jpg"]

    page = tmp_path / "hits.html"
    args = ["query", out, PLANTED_CAPTION, "-k", "5", "--html", page]
    lines = run("mmjax.tools.search", args, cache_dir).stdout.splitlines()
    assert len(lines) == 5
    rows = [line.split("\t") for line in lines]
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]
    scores = [float(r[1]) for r in rows]
    assert all(len(r[1].split(".")[1]) == 4 for r in rows) and scores == sorted(scores)[::-1]
    assert rows[0][2] == str(planted_folder.resolve() / "planted.jpg"), lines
    html = page.read_text()
    assert html.count("<img") == 5 and all(r[2] in html for r in rows)

    # Interrupted after the first chunk: the rerun embeds the rest and gives the same index.
    before = SearchIndex.load(out)
    manifest["chunks"], manifest["complete"] = manifest["chunks"][:1], False
    (out / MANIFEST).write_text(json.dumps(manifest))
    proc = run("mmjax.tools.search", [*index_args, "--chunk-size", "8"], cache_dir)
    assert "16 embedded now, 9 already done" in proc.stdout, proc.stdout
    after = SearchIndex.load(out)
    assert after.paths == before.paths
    np.testing.assert_allclose(after.embeddings, before.embeddings, atol=1e-5)

    # Another model's index is refused before anything is loaded.
    other = ["index", "--workdir", tmp_path / "other_run", planted_folder, "--out", out]
    _one_line_error(_cli("mmjax.tools.search", other, cache_dir), "--overwrite")


SHARDED_SCRIPT = """
import json, sys
from pathlib import Path
import jax, numpy as np
from mmjax.data.shapes import ShapesSource
from mmjax.inference.predictor import Predictor

learned, workdir = Path(sys.argv[1]), Path(sys.argv[2])
# The learned run, as if trained on a data=2 x fsdp=2 x tensor=2 mesh of 8 devices.
config = json.loads((learned / "config.json").read_text())
config["mesh"].update(data=2, fsdp=2, tensor=2)
workdir.mkdir()
(workdir / "config.json").write_text(json.dumps(config))
for name in ("checkpoints", "tokenizer.model"):
    (workdir / name).symlink_to(learned / name)
notes = []
eight = Predictor.from_workdir(workdir)
one = Predictor.from_workdir(workdir, devices=jax.devices()[:1], warn=notes.append)
source = ShapesSource("eval", 16, seed=0, image_size=32)
images = [source[i]["image"] for i in range(10)]  # Not a multiple of the 4-way batch split.
texts = [source.caption(i) for i in range(10)]
split = [l for l in jax.tree.leaves(eight.params) if not l.sharding.is_fully_replicated]
print(json.dumps(dict(
    meshes=[dict(eight.mesh.shape), dict(one.mesh.shape)],
    sharded_leaves=len(split),
    notes=notes,
    image=float(np.abs(eight.embed_images(images) - one.embed_images(images)).max()),
    text=float(np.abs(eight.embed_texts(texts) - one.embed_texts(texts)).max()),
)))
"""


@pytest.mark.slow
def test_sharded_predictor_matches_one_device(learned, tmp_path, cache_dir):
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT, str(learned), str(tmp_path / "run8")],
        cwd=REPO,
        env=env_for(cache_dir, devices=8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    eight, one = result["meshes"]
    assert eight == {"data": 2, "fsdp": 2, "tensor": 2}
    assert one == {"data": 1, "fsdp": 1, "tensor": 1}
    assert len(result["notes"]) == 1 and "saved mesh does not fit" in result["notes"][0]
    assert result["sharded_leaves"] > 0  # Weights really were split over fsdp / tensor.
    assert result["image"] < 1e-5 and result["text"] < 1e-5, result

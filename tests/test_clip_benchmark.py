"""`mmjax evaluate --format clip_benchmark` equals CLIP_benchmark's own numbers.

A converted open_clip CLIP is fine-tuned briefly on the built-in corpus, evaluated by mmjax
on generated datasets (zero-shot colour classification with prompt templates and image-text
retrieval from a CSV; retrieval with five captions per image from a Karpathy split file in
Flickr30k's layout; zero-shot classification of ImageNet-style class folders with the shipped
80 OpenAI ImageNet templates), then exported to open_clip and evaluated by the
`clip-benchmark` package's own zero-shot classification and retrieval functions on the same
files, class names and templates. The two agree to 1e-3.
"""

import json

import numpy as np
import pytest
from PIL import Image

from mmjax.data.shapes import ShapesSource
from mmjax.inference.prompts import read_classes, read_templates
from mmjax.interop.open_clip import convert_open_clip
from tests.runs import mmjax_cli
from tests.test_open_clip_parity import ROOT, _save, build, clip_config, open_clip, torch

classification = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")

CLASSES = ROOT / "configs" / "zeroshot" / "shapes_colours.txt"
TEMPLATES = ROOT / "configs" / "zeroshot" / "shapes_colour_templates.txt"


def _dataset(folder, size, count=96):
    """PNG files at the model's resolution (neither side resamples them) and a CSV with
    filepath, caption and colour columns."""
    source = ShapesSource("eval", count, 3, size)
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(count):
        example = source[i]
        Image.fromarray(example["image"]).save(folder / "images" / f"{i:03d}.png")
        rows.append((f"images/{i:03d}.png", example["caption"], source.attributes(i)["colour"]))
    lines = ["filepath,caption,colour"] + [",".join(row) for row in rows]
    (folder / "data.csv").write_text("\n".join(lines) + "\n")
    return rows


CAPTION_FORMS = ("{}", "an image: {}", "there is {}", "look, {}", "{} here")


def _standard_sets(folder, size, classes, count=48):
    """The same kind of images as a Karpathy split file (Flickr30k layout, five captions per
    image, all in the test split) and as ImageNet-style class folders (n000, n001, ... in the
    order of `classes`). Images with a caption seen before are left out, so no two images share
    a caption (CLIP_benchmark breaks ties by position, mmjax by expectation)."""
    source = ShapesSource("eval", 400, 5, size)
    flickr, imagenet = folder / "flickr", folder / "imagenet"
    (flickr / "flickr30k-images").mkdir(parents=True)
    for i in range(len(classes)):
        (imagenet / f"n{i:03d}").mkdir(parents=True)
    seen, entries, pairs, labelled = set(), [], [], []
    for i in range(len(source)):
        example = source[i]
        if example["caption"] in seen:
            continue
        seen.add(example["caption"])
        captions = [form.format(example["caption"]) for form in CAPTION_FORMS]
        Image.fromarray(example["image"]).save(flickr / "flickr30k-images" / f"{i}.png")
        entries.append({"split": "test", "filename": f"{i}.png",
                        "sentences": [{"raw": c} for c in captions]})  # fmt: skip
        pairs.append((f"flickr/flickr30k-images/{i}.png", captions))
        label = classes.index(source.attributes(i)["colour"])
        path = f"imagenet/n{label:03d}/{i}.png"
        Image.fromarray(example["image"]).save(folder / path)
        labelled.append((path, label))
        if len(pairs) == count:
            break
    (flickr / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    return pairs, sorted(labelled)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, folder, rows, transform, classes=()):
        self.folder, self.rows, self.transform = folder, rows, transform
        self.classes = list(classes)  # CLIP_benchmark reads dataset.classes.

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        path, target = self.rows[i]
        return self.transform(Image.open(self.folder / path)), target


def _accuracy(output, target, topk=(1,)):
    """clip_benchmark 1.6.2's `accuracy` with `.item()` where it calls float() on a 1-element
    array, which numpy >= 2.4 refuses; the count is its own."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def _run(cwd, *args):
    proc = mmjax_cli(cwd, *args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


class _Files(torch.utils.data.Dataset):
    def __init__(self, folder, rows, transform, classes, texts):
        self.folder, self.rows, self.transform = folder, rows, transform
        self.classes, self.texts = classes, texts

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        path, caption, colour = self.rows[i]
        image = self.transform(Image.open(self.folder / path))
        return (image, [caption]) if self.texts else (image, self.classes.index(colour))


@pytest.mark.slow
def test_mmjax_numbers_equal_clip_benchmarks(tmp_path, monkeypatch):
    monkeypatch.setattr(classification, "accuracy", _accuracy)
    config = clip_config(image=32, patch=8, vw=64, vl=2, hw=32, tw=64, th=2, tl=2, ctx=20, embed=48)
    config["text_cfg"]["vocab_size"] = 49408
    cfg_path, ckpt = _save(build(config, 11), config, tmp_path)
    convert_open_clip(cfg_path, ckpt, tmp_path / "converted", progress=False)
    _run(tmp_path, "train", "--config", f"{ROOT}/configs/clip.py:size=tiny", "--workdir", "ft",
         "--config.init_from=converted", "--config.total_steps=60", "--config.batch_size=32",
         "--config.eval_every=1000", "--config.checkpoint_every=60", "--config.log_every=20",
         "--config.optimizer.warmup_steps=5", "--config.optimizer.learning_rate=0.001",
         "--config.data.eval_examples=32", "--config.eval.batch_size=32")  # fmt: skip
    rows = _dataset(tmp_path / "labelled", 32)
    classes, templates = read_classes(CLASSES), read_templates(TEMPLATES)
    captioned, labelled = _standard_sets(tmp_path / "standard", 32, classes)

    evals = {
        "colours": dict(
            type="zeroshot",
            data="csv:labelled/data.csv",
            label="colour",
            classes=str(CLASSES),
            templates=str(TEMPLATES),
        ),  # fmt: skip
        "pairs": dict(type="retrieval", data="csv:labelled/data.csv"),
        "flickr": dict(type="retrieval", data="karpathy:standard/flickr/dataset_flickr30k.json"),
        "imagenet": dict(
            type="zeroshot",
            data="folders:standard/imagenet",
            label="index",
            classes=str(CLASSES),
            templates="configs/zeroshot/imagenet_openai_templates.txt",
        ),
    }
    added = [f"--config.evals.{k}={v!r}" for k, v in evals.items()]
    _run(tmp_path, "evaluate", "--workdir", "ft", "--format", "clip_benchmark",
         "--only", ",".join(evals), *added)  # fmt: skip
    ours = {
        name: json.loads((tmp_path / "ft" / "eval" / "clip_benchmark" / f"{name}.json").read_text())
        for name in evals
    }
    assert ours["colours"]["task"] == "zeroshot_classification"
    assert ours["colours"]["dataset"] == "csv:labelled/data.csv"
    assert ours["pairs"]["task"] == ours["flickr"]["task"] == "zeroshot_retrieval"
    assert set(ours["colours"]) == {"dataset", "model", "pretrained", "task", "metrics", "language"}

    _run(tmp_path, "export", "open_clip", "--workdir", "ft", "--out", "exported")
    model, _, preprocess = open_clip.create_model_and_transforms(
        f"local-dir:{tmp_path / 'exported'}"
    )
    model.eval()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=20)
    folder = tmp_path / "labelled"
    loader = torch.utils.data.DataLoader(
        _Files(folder, rows, preprocess, classes, texts=False), batch_size=32
    )
    # CLIP_benchmark's templates name their slot {c}.
    their_templates = [t.replace("{}", "{c}") for t in templates]
    theirs = classification.evaluate(
        model, loader, tokenizer, classes, their_templates, "cpu", amp=False
    )
    pairs = torch.utils.data.DataLoader(
        _Files(folder, rows, preprocess, classes, texts=True), batch_size=32,
        collate_fn=lambda batch: (torch.stack([b[0] for b in batch]), [b[1] for b in batch]),
    )  # fmt: skip
    theirs.update(retrieval.evaluate(model, pairs, tokenizer, "cpu", amp=False,
                                     recall_k_list=[1, 5, 10]))  # fmt: skip

    mine = {**ours["colours"]["metrics"], **ours["pairs"]["metrics"]}
    assert set(mine) == set(theirs), (sorted(mine), sorted(theirs))
    for key, value in theirs.items():
        assert mine[key] == pytest.approx(value, abs=1e-3), (key, mine, theirs)

    standard = tmp_path / "standard"
    flickr = torch.utils.data.DataLoader(
        _Rows(standard, captioned, preprocess), batch_size=16,
        collate_fn=lambda batch: (torch.stack([b[0] for b in batch]), [b[1] for b in batch]),
    )  # fmt: skip
    theirs_flickr = retrieval.evaluate(model, flickr, tokenizer, "cpu", amp=False,
                                       recall_k_list=[1, 5, 10])  # fmt: skip
    imagenet_templates = read_templates(ROOT / "configs/zeroshot/imagenet_openai_templates.txt")
    theirs_imagenet = classification.evaluate(
        model,
        torch.utils.data.DataLoader(_Rows(standard, labelled, preprocess, classes), batch_size=16),
        tokenizer, classes, [t.replace("{}", "{c}") for t in imagenet_templates], "cpu",
        amp=False,
    )  # fmt: skip
    for name, want in (("flickr", theirs_flickr), ("imagenet", theirs_imagenet)):
        got = ours[name]["metrics"]
        assert set(got) == set(want), (name, sorted(got), sorted(want))
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-3), (name, key, got, want)
    # Not degenerate comparisons.
    assert 0 < theirs_flickr["text_retrieval_recall@1"] < 1
    assert theirs_imagenet["acc1"] > 2 / len(classes), theirs_imagenet
    # Not a degenerate comparison: the fine-tuned model is far from chance on colours.
    assert theirs["acc1"] > 2 / len(classes), theirs
    assert 0 < theirs["image_retrieval_recall@5"] < 1


def test_metric_names_follow_clip_benchmark():
    from mmjax.evals.clip_benchmark import records

    metrics = {"eval/z/accuracy": 0.5, "eval/z/top5_accuracy": 0.9,
               "eval/z/mean_per_class_recall": 0.4, "eval/r/i2t_r1": 0.1, "eval/r/t2i_r1": 0.2,
               "eval/r/i2t_r5": 0.3, "eval/r/t2i_r5": 0.6, "eval/i2t_r1": 0.7, "eval/t2i_r1": 0.8,
               "eval/c/bleu4": 0.3}  # fmt: skip
    found = records(
        metrics,
        {
            "z": ("zeroshot", "csv:a"),
            "r": ("retrieval", "csv:b"),
            "default": ("default", "shapes"),
            "c": ("captioning", "shapes"),
        },  # fmt: skip
        model="run",
        pretrained="run@5",
    )
    assert set(found) == {"z", "r", "default"}  # Captioning has no CLIP_benchmark task.
    assert found["z"]["metrics"] == {"acc1": 0.5, "acc5": 0.9, "mean_per_class_recall": 0.4}
    assert found["r"]["metrics"] == {
        "image_retrieval_recall@1": 0.2, "text_retrieval_recall@1": 0.1,
        "image_retrieval_recall@5": 0.6, "text_retrieval_recall@5": 0.3,
    }  # fmt: skip
    assert found["default"]["metrics"] == {
        "image_retrieval_recall@1": 0.8,
        "text_retrieval_recall@1": 0.7,
    }
    assert found["default"]["dataset"] == "shapes" and found["r"]["pretrained"] == "run@5"


def test_mean_per_class_recall_is_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    from mmjax.evals.metrics.classification import classification_metrics

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 200)  # Class 5 never occurs as a label, only as a guess.
    scores = rng.normal(size=(200, 6))
    scores[np.arange(200), labels] += 1.0
    got = classification_metrics(labels, scores)
    with pytest.warns(UserWarning):
        want = balanced_accuracy_score(labels, scores.argmax(1))
    assert got["mean_per_class_recall"] == pytest.approx(want)
    assert got["macro_recall"] != pytest.approx(want)  # Counts the never-true class too.

"""The standard evaluation sets as files: COCO caption annotations, Karpathy split files
(COCO and Flickr30k layouts), ImageNet-style class folders with the shipped ImageNet class
names and OpenAI templates, and retrieval with five captions per image (the CLIP rule)."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mmjax.data.caption_files import CocoCaptionsSource, KarpathySource
from mmjax.data.class_folders import ClassFolderSource
from mmjax.data.sources import make_source
from mmjax.evals.context import reference_groups
from mmjax.evals.labels import label_reader
from mmjax.evals.metrics.retrieval import grouped_retrieval_metrics
from mmjax.evals.zeroshot import ZeroShotEval
from mmjax.inference.prompts import read_classes, read_templates
from mmjax.runtime.config import ConfigError, load_config
from tests.runs import REPO


def _image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), np.uint8)
    Image.fromarray(pixels).save(path)


def _karpathy(root, layout):
    """A Karpathy split file: 4 images (test, test, train, restval), 5 captions each."""
    images = []
    for i, split in enumerate(("test", "test", "train", "restval")):
        sentences = [{"raw": f"image {i} caption {c}", "tokens": []} for c in range(5)]
        entry = {"split": split, "filename": f"{i}.jpg", "imgid": i, "sentences": sentences}
        if layout == "coco":
            entry["filepath"] = "val2014"
            _image(root / "val2014" / f"{i}.jpg", i)
        else:
            _image(root / "flickr30k-images" / f"{i}.jpg", i)
        images.append(entry)
    name = "dataset_coco.json" if layout == "coco" else "dataset_flickr30k.json"
    (root / name).write_text(json.dumps({"images": images, "dataset": layout}))
    return root / name


@pytest.mark.parametrize("layout", ["coco", "flickr30k"])
def test_karpathy_splits_and_image_paths(tmp_path, layout):
    path = _karpathy(tmp_path, layout)
    test = KarpathySource(str(path), "eval")
    assert len(test) == 10 and test.caption(5) == "image 1 caption 0"
    folder = "val2014" if layout == "coco" else "flickr30k-images"
    assert test.image_path(0) == str(tmp_path / folder / "0.jpg")
    record = test[7]
    assert record["image"] == (tmp_path / folder / "1.jpg").read_bytes()
    assert record["caption"] == "image 1 caption 2"
    first, groups = reference_groups(test)
    assert first == [0, 5] and groups == [list(range(5)), list(range(5, 10))]
    train = make_source(f"karpathy:{path}", split="train", data=None, image_size=32)
    assert sorted({train.image_path(i)[-5:] for i in range(len(train))}) == ["2.jpg", "3.jpg"]


def test_coco_captions_file(tmp_path):
    root = tmp_path / "coco"
    for i in (7, 3):
        _image(root / "val2017" / f"{i:012d}.jpg", i)
    notes = [
        {"image_id": 7, "id": 1, "caption": "a dog"},
        {"image_id": 3, "id": 2, "caption": "a cat"},
        {"image_id": 7, "id": 3, "caption": "a brown dog"},
    ]
    images = [
        {"id": 7, "file_name": "000000000007.jpg"},
        {"id": 3, "file_name": "000000000003.jpg"},
    ]
    (root / "annotations").mkdir()
    path = root / "annotations" / "captions_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": notes}))
    source = make_source(f"coco:{path}", split="eval", data=None, image_size=32)
    assert isinstance(source, CocoCaptionsSource)
    assert [source.caption(i) for i in range(3)] == ["a cat", "a dog", "a brown dog"]
    assert source.image_path(1) == str(root / "val2017" / "000000000007.jpg")
    assert reference_groups(source)[1] == [[0], [1, 2]]


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "not a COCO captions file (expected a JSON object)"),
        ('{"images": []}', "no 'annotations' list; not a COCO captions file"),
        ('{"images": [], "annotations": [{"image_id": 1, "caption": "x"}]}',
         "annotation for unknown image id 1"),
        ("{nope", "not JSON"),
    ],
)  # fmt: skip
def test_broken_coco_files_are_one_line_errors(tmp_path, content, message):
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "captions_val2017.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        CocoCaptionsSource(str(path))
    assert "\n" not in str(error.value)


def test_broken_karpathy_files_are_one_line_errors(tmp_path):
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": [{"split": "test", "filename": "a.jpg"}]}))
    with pytest.raises(ValueError, match=r"images\[0\] lacks 'split', 'filename' or 'sentences'"):
        KarpathySource(str(path), "eval")
    path.write_text(json.dumps({"images": [{"split": "train", "filename": "a.jpg",
                                            "sentences": [{"raw": "x"}]}]}))  # fmt: skip
    with pytest.raises(ValueError, match=r"no images in split\(s\) \['test'\]"):
        KarpathySource(str(path), "eval")


def test_class_folders_and_their_labels(tmp_path):
    for wnid, count in (("n02", 2), ("n01", 1), ("n03", 1)):
        for i in range(count):
            _image(tmp_path / "val" / wnid / f"img{i}.JPEG", i)
    (tmp_path / "val" / "n01" / "notes.txt").write_text("not an image")
    source = make_source(f"folders:{tmp_path / 'val'}", split="eval", data=None, image_size=32)
    assert isinstance(source, ClassFolderSource) and source.classes == ["n01", "n02", "n03"]
    assert len(source) == 4 and source[1]["key"] == "n02/img0.JPEG"
    assert [label_reader(source, "index", "x")(i) for i in range(4)] == [0, 1, 1, 2]
    assert label_reader(source, "folder", "x")(3) == "n03"
    with pytest.raises(ConfigError, match=r"class folders have labels \['index', 'folder'\]"):
        label_reader(source, "colour", "evals.z.label")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ClassFolderSource(str(tmp_path / "val" / "n01"))


def test_imagenet_class_names_and_openai_templates_ship_as_data():
    classes_file = REPO / "configs" / "zeroshot" / "imagenet_classnames.txt"
    classes = read_classes(classes_file, allow_repeats=True)
    assert len(classes) == 1000 and classes[:2] == ["tench", "goldfish"]
    # Two names repeat (two ImageNet classes each), so the list is read by position.
    with pytest.raises(ValueError, match=r"imagenet_classnames.txt:\d+: class '\w+' repeats"):
        read_classes(classes_file)
    templates = read_templates(REPO / "configs" / "zeroshot" / "imagenet_openai_templates.txt")
    assert len(templates) == 80 and templates[0] == "a bad photo of a {}."


def test_zeroshot_by_position_needs_one_class_per_folder(tmp_path):
    for wnid in ("n01", "n02"):
        _image(tmp_path / "val" / wnid / "a.png")
    config = load_config("configs/coca.py:size=tiny")
    source = ClassFolderSource(str(tmp_path / "val"))
    ctx = SimpleNamespace(config=config, source=lambda spec, where: source)
    block = {"type": "zeroshot", "data": "folders:val", "label": "index",
             "classes": "configs/zeroshot/imagenet_classnames.txt"}  # fmt: skip
    with pytest.raises(ConfigError, match="has 2 class folders but .* lists 1000 classes"):
        ZeroShotEval("imagenet", block, ctx)


def _brute_force(image, text, owner, k):
    """The CLIP rule by sorting (no ties in random data)."""
    scores = image @ text.T
    i2t = np.mean([np.isin(np.argsort(-row)[:k], np.flatnonzero(owner == q)).any()
                   for q, row in enumerate(scores)])  # fmt: skip
    t2i = np.mean([owner[t] in np.argsort(-scores[:, t])[:k] for t in range(len(text))])
    return i2t, t2i


def test_grouped_retrieval_follows_the_clip_rule():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(40, 16)).astype(np.float32)
    owner = np.repeat(np.arange(40), 5)
    text = (image[owner] + 1.5 * rng.normal(size=(200, 16))).astype(np.float32)
    got = grouped_retrieval_metrics(image, text, owner, chunk_size=7)
    for k in (1, 5, 10):
        i2t, t2i = _brute_force(image, text, owner, k)
        assert got[f"i2t_r{k}"] == pytest.approx(i2t) and got[f"t2i_r{k}"] == pytest.approx(t2i)
    assert 0.1 < got["i2t_r1"] < 1 and got["i2t_r1"] > got["t2i_r1"]  # Five chances vs one.
    # Constant embeddings are chance: an image's 5 captions among 200, a caption's image in 40.
    flat = grouped_retrieval_metrics(np.ones((40, 4)), np.ones((200, 4)), owner)
    assert flat["i2t_r1"] == pytest.approx(5 / 200) and flat["t2i_r1"] == pytest.approx(1 / 40)
    assert flat["t2i_mean_rank"] == pytest.approx(20.5)
    with pytest.raises(ValueError, match="every image needs at least one caption"):
        grouped_retrieval_metrics(image, text, np.zeros(200, np.int64))

"""Named evaluators (mmjax/evals): config handling, labels, reference grouping, the linear
probe, and the evaluate CLI end to end on a trained run, identical on 1 and 8 devices."""

import json

import numpy as np
import pytest

from mmjax.data.csv_source import CsvSource
from mmjax.data.shapes import ShapesSource
from mmjax.evals.base import settings
from mmjax.evals.captioning import reference_groups
from mmjax.evals.context import Subset
from mmjax.evals.labels import label_reader
from mmjax.evals.linear_probe import fit_linear_probe
from mmjax.evals.suite import named_blocks
from mmjax.runtime.config import ConfigError, load_config
from tests.runs import run

NEEDS = {"test_evaluate_named_evaluators_same_on_1_and_8_devices": ("learned",)}


def _config(*overrides):
    return load_config("configs/coca.py:size=tiny", list(overrides))


def test_unknown_type_and_setting_are_config_errors():
    config = _config("evals.x={'type': 'zeroshoot'}")
    with pytest.raises(ConfigError, match=r"evals.x.type='zeroshoot'; allowed: \['captioning'"):
        named_blocks(config)
    block = {"type": "retrieval", "exampels": 5}
    with pytest.raises(ConfigError, match=r"evals.r: unknown setting\(s\) \['exampels'\]"):
        settings("r", block, {}, _config())
    with pytest.raises(ConfigError, match="evals.r.every must be an integer >= 0"):
        settings("r", {"type": "retrieval", "every": -1}, {}, _config())


def test_command_line_adds_evaluators_and_settings():
    config = _config(
        "evals.probe={'type': 'classification', 'steps': 50}",
        "evals.zeroshot.examples=10",
        "evals.zeroshot.label=colour",
    )
    assert dict(config.evals.probe) == {"type": "classification", "steps": 50}
    assert config.evals.zeroshot.examples == 10 and config.evals.zeroshot.label == "colour"
    # Unset settings resolve to the run's: data.eval, eval.batch_size, eval_every.
    resolved = settings("probe", config.evals.probe, {"steps": 500}, config)
    assert (resolved["data"], resolved["batch_size"], resolved["every"]) == ("shapes", 128, 500)
    assert resolved["steps"] == 50
    with pytest.raises(ConfigError, match="adds an evaluator: give a dict"):
        _config("evals.new=zeroshot")


def test_labels_of_shapes_and_csv(tmp_path):
    shapes = ShapesSource("eval", num_examples=20, image_size=32)
    read = label_reader(shapes, "colour", "evals.z.label")
    assert [read(i) for i in range(20)] == [shapes.attributes(i)["colour"] for i in range(20)]
    subset = Subset(shapes, [7, 3])
    assert label_reader(subset, "shape", "w")(1) == shapes.attributes(3)["shape"]
    with pytest.raises(ConfigError, match=r"evals.z.label: the shapes corpus has labels"):
        label_reader(shapes, "texture", "evals.z.label")

    (tmp_path / "a.csv").write_text("filepath,caption,label\nx.jpg,one,cat\n\ny.jpg,two,dog\n")
    csv_source = CsvSource(tmp_path / "a.csv")
    assert [label_reader(csv_source, "label", "w")(i) for i in range(2)] == ["cat", "dog"]
    with pytest.raises(ConfigError, match="no label column 'kind'"):
        label_reader(csv_source, "kind", "w")


def test_csv_rows_of_one_image_are_one_captioning_example(tmp_path):
    rows = ["a.jpg,a red circle", "b.jpg,a cat", "a.jpg,a round red thing", "c.jpg,x", "b.jpg,y"]
    (tmp_path / "c.csv").write_text("filepath,caption\n" + "\n".join(rows) + "\n")
    first, groups = reference_groups(CsvSource(tmp_path / "c.csv"))
    assert first == [0, 1, 3]
    assert groups == [[0, 2], [1, 4], [3]]
    shapes_first, shapes_groups = reference_groups(ShapesSource("eval", num_examples=3))
    assert shapes_first == [0, 1, 2] and shapes_groups == [[0], [1], [2]]


def test_linear_probe_fits_separable_classes():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    labels = rng.integers(0, 4, 400)
    x = centres[labels] + 0.3 * rng.normal(size=(400, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    weights, bias = fit_linear_probe(x, labels, 4, steps=300, learning_rate=0.05, l2=1e-4)
    assert weights.shape == (16, 4) and bias.shape == (4,)
    assert np.mean(np.argmax(x @ weights + bias, axis=1) == labels) > 0.97
    # Deterministic: the same fit twice gives the same bits.
    again = fit_linear_probe(x, labels, 4, steps=300, learning_rate=0.05, l2=1e-4)
    np.testing.assert_array_equal(weights, again[0])


EVAL_ARGS = [
    # 100 examples in batches of 32: the last batch is padded.
    "--config.data.eval_examples=100",
    "--config.eval.batch_size=32",
    "--config.eval.caption_examples=40",
    "--config.evals.probe={'type': 'classification', 'label': 'colour', 'train_examples': 512, "
    "'steps': 300}",
]
# Beam search compiles a larger program: on one device only (tests/test_generate.py checks
# its tokens against a reference).
BEAM = [
    "--config.evals.beam={'type': 'captioning', 'examples': 24, "
    "'generate': {'method': 'beam', 'beam_size': 3}}",
]


@pytest.mark.slow
def test_evaluate_named_evaluators_same_on_1_and_8_devices(runs, cache_dir, tmp_path):
    workdir, _ = runs.get("learned")
    results = {}
    for devices, extra in (
        (1, ["--only=default,captioning,zeroshot,probe,beam", *BEAM]),
        (
            8,
            [
                "--only=default,captioning,zeroshot,probe",
                "--config.mesh.fsdp=2",
                "--config.mesh.tensor=2",
            ],
        ),
    ):
        run(
            "mmjax.evaluate", ["--workdir", workdir, *EVAL_ARGS, *extra], cache_dir, devices=devices
        )
        results[devices] = json.loads((workdir / "eval.json").read_text())
    one, eight = results[1], results[8]
    assert sorted(k for k in one if not k.startswith("eval/beam/")) == sorted(eight)
    for key in eight:
        if not key.endswith("/seconds") and key != "eval/seconds":
            assert one[key] == pytest.approx(eight[key], abs=1e-5), key

    # Every example once: 100 images (none bad), padding dropped.
    for name in ("", "zeroshot/", "probe/"):
        assert one[f"eval/{name}num_examples"] == 100, name
    assert one["eval/captioning/num_examples"] == 100
    assert one["eval/beam/num_examples"] == 24
    # The trained model knows its colours (chance: 1/8) and captions.
    assert one["eval/zeroshot/accuracy"] > 0.8, one
    assert one["eval/probe/accuracy"] > 0.8, one
    assert one["eval/captioning/bleu4"] > 0.6 and one["eval/captioning/cider"] > 2.0, one
    assert one["eval/beam/bleu4"] > 0.6, one
    for name in ("zeroshot", "probe"):
        confusion = json.loads(
            (workdir / "eval" / name / f"confusion_{one['step']}.json").read_text()
        )
        assert np.sum(confusion["matrix"]) == 100
        assert (workdir / "eval" / name / f"confusion_{one['step']}.png").stat().st_size > 1000
    captions = (workdir / "eval" / "captioning" / f"captions_{one['step']}.jsonl").read_text()
    assert len(captions.splitlines()) == 100

    proc = run("mmjax.evaluate", ["--workdir", workdir, "--only=nope"], cache_dir, check=False)
    assert proc.returncode == 2
    assert "--only ['nope']: no such evaluator" in proc.stderr

"""Every command in README.md's bash blocks runs, as written, from a fresh copy of the tree.

The commands run in README order in one copy of the tree (later sections read what earlier
ones wrote, as they would for a user going down the page), from its root, with relative
paths, through bash. The only changes are the shrinks the README itself names in its
"Trying the commands" note (fewer steps and examples, a smaller model size for the dry run,
pytest's --collect-only for the test command, which CI runs in full), and the files a user
brings (a folder of photos, open_clip weights, a Hugging Face CLIP folder) are written
first by FIXTURES. A bash block command that this test does not know how to run fails it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.runs import FAST_COMPILE, REPO
from tests.test_user_contract import fresh_tree

README = REPO / "README.md"

# Per command family, the README-named overrides the test adds (or values it lowers). Every
# flag named here must appear in the README's note, so a reader knows the test's liberties.
TRAIN_SHRINK = ["--config.total_steps=12", "--config.data.eval_examples=64"]
SHRINKABLE_FLAGS = ("--config.total_steps", "--config.data.eval_examples", "--num-examples",
                    "--steps", "--devices", "size=", "batch=", "--collect-only")  # fmt: skip


@dataclass
class Command:
    section: str
    text: str  # as written (continuations joined, comment dropped)
    line: int


def readme_commands(text: str) -> list[Command]:
    """The commands of the ```bash blocks, with the heading they sit under."""
    commands, section, block, pending, start = [], "", None, "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if block is None:
            if stripped.startswith("#"):
                section = stripped.lstrip("#").strip()
            elif stripped.startswith("```"):
                block = stripped[3:].strip()
            continue
        if stripped.startswith("```"):
            block = None
            continue
        if block != "bash" or (not pending and (not stripped or stripped.startswith("#"))):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        words = shlex.split(pending + stripped, comments=True)
        pending = ""
        if words:
            commands.append(Command(section, shlex.join(words), start))
    return commands


def shrink(command: str) -> str:
    """The command with the README's named shrinks applied."""
    words = shlex.split(command)
    verb = lambda w, before: (
        (w in ("train", "sweep") and before.endswith("mmjax"))
        or (w in ("mmjax.train", "mmjax.tools.sweep") and before == "-m")
    )
    trains = any(verb(w, before) for before, w in zip(words, words[1:])) or (
        words[:2] == ["bash", "launch/local.sh"] and words[2:3] not in (["test"], ["setup"])
    )
    if words[:3] == ["bash", "launch/local.sh", "test"]:
        return shlex.join([*words, "--collect-only", "-q"])
    # The dry run and the benchmarks compile a model of the size they name: tiny here.
    sizes = any(
        w in ("dryrun", "bench", "mmjax.tools.dryrun", "mmjax.benchmarks.train_step") for w in words
    )
    out, skip = [], False
    for i, word in enumerate(words):
        if skip:
            skip = False
            continue
        if word in ("--num-examples",):
            out += [word, str(min(int(words[i + 1]), 160))]
            skip = True
        elif word == "--steps":
            out += [word, "1"]
            skip = True
        elif word == "--devices":
            out += [word, "4"]
            skip = True
        elif word == "--topology":
            out += [word, "v5e:2x2"]
            skip = True
        elif sizes and word.startswith("configs/") and ":" in word:
            word = re.sub(r"size=\w+", "size=tiny", word)
            out.append(re.sub(r"batch=\d+", "batch=16", word))
        else:
            out.append(word)
    if trains and "--print" not in out and "--dry-run" not in out:
        out += TRAIN_SHRINK
    return shlex.join(out)


def write_photos(tree: Path) -> None:
    folder = tree / "photos"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("cat.jpg", "dog.jpg", "boat.png"):
        array = rng.integers(0, 255, (48, 64, 3), np.uint8)
        Image.fromarray(array).save(folder / name)


def write_open_clip_weights(tree: Path) -> None:
    """A small random open_clip CoCa (CLIP's BPE vocabulary), saved as a user's model-config
    JSON and safetensors checkpoint."""
    from safetensors.torch import save_file

    from tests.test_open_clip_parity import build, coca_config

    config = coca_config(image=32, patch=8, vw=32, vl=1, hw=16, tw=32, th=2, tl=1, ctx=15,
                         embed=32, queries=5, dl=1)  # fmt: skip
    config["text_cfg"]["vocab_size"] = config["multimodal_cfg"]["vocab_size"] = 49408
    model = build(config, seed=5)
    (tree / "my_coca.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tree / "my_coca.safetensors"))


def write_hf_clip(tree: Path) -> None:
    """A small random transformers CLIPModel, saved as a user's save_pretrained folder."""
    from tests.test_hf_clip import _hf_model

    _hf_model(seed=3).save_pretrained(tree / "my_clip_hf")


def write_hf_siglip(tree: Path) -> None:
    """A small random transformers SiglipModel folder with its spiece.model."""
    import transformers

    from tests.test_hf_siglip import _config, _perturb, _spiece

    _perturb(transformers.SiglipModel(_config()), seed=3).save_pretrained(tree / "my_siglip_hf")
    _spiece(tree / "my_siglip_hf" / "spiece.model")


def write_big_vision_siglip(tree: Path) -> None:
    """Random big_vision SigLIP weights with a Ti/16 image tower, and a SentencePiece model."""
    from tests.test_hf_siglip import _big_vision_params, _config, _spiece

    cfg = _config(
        vision=dict(hidden_size=192, intermediate_size=768, num_attention_heads=3,
                    num_hidden_layers=12, patch_size=16),
        text=dict(hidden_size=192, intermediate_size=384, num_attention_heads=3),
    )  # fmt: skip
    np.savez(tree / "my_siglip.npz", **_big_vision_params(cfg))
    _spiece(tree / "my_siglip_spm.model")


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), np.uint8)
    Image.fromarray(pixels).save(path)


def write_coco(tree: Path) -> None:
    """COCO's layout: annotations/captions_val2017.json, images in val2017/."""
    images, notes = [], []
    for i in range(4):
        name = f"{i:012d}.jpg"
        _png(tree / "coco" / "val2017" / name, i)
        images.append({"id": i, "file_name": name})
        notes += [{"image_id": i, "id": 5 * i + c, "caption": f"a small red circle {c}"}
                  for c in range(5)]  # fmt: skip
    (tree / "coco" / "annotations").mkdir(parents=True)
    captions = {"images": images, "annotations": notes}
    (tree / "coco" / "annotations" / "captions_val2017.json").write_text(json.dumps(captions))


def write_flickr30k(tree: Path) -> None:
    """Karpathy's dataset_flickr30k.json beside flickr30k-images/."""
    entries = []
    for i in range(6):
        _png(tree / "flickr30k" / "flickr30k-images" / f"{i}.jpg", 10 + i)
        sentences = [{"raw": f"a large blue square {c}"} for c in range(5)]
        split = "test" if i < 4 else "train"
        entries.append({"split": split, "filename": f"{i}.jpg", "sentences": sentences})
    (tree / "flickr30k" / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))


def write_imagenet(tree: Path) -> None:
    """ImageNet's validation layout: 1000 class folders (sorted like the class-name list),
    one image in each of the first few."""
    for i in range(1000):
        (tree / "imagenet" / "val" / f"n{i:08d}").mkdir(parents=True)
    for i in range(0, 1000, 125):
        _png(tree / "imagenet" / "val" / f"n{i:08d}" / "ILSVRC2012_val.JPEG", 20 + i)


# A path a command reads that a user brings -> what writes it.
FIXTURES = {
    "photos/": write_photos,
    "my_coca.safetensors": write_open_clip_weights,
    "my_clip_hf": write_hf_clip,
    "my_siglip_hf": write_hf_siglip,
    "my_siglip.npz": write_big_vision_siglip,
    "coco/annotations": write_coco,
    "flickr30k/": write_flickr30k,
    "imagenet/val": write_imagenet,
}


def test_readme_commands_are_a_list_of_runnable_commands():
    commands = readme_commands(README.read_text())
    assert len(commands) >= 20, [c.text for c in commands]
    for command in commands:
        assert "[" not in command.text.replace("'[", "").replace('"[', ""), (
            f"README.md:{command.line}: optional parts in brackets are not a command; show "
            f"the syntax in prose or a text block: {command.text}"
        )
        assert "..." not in command.text, f"README.md:{command.line}: {command.text}"
    note = README.read_text()
    for flag in SHRINKABLE_FLAGS:
        assert flag in note, f"the README's note does not name the shrink {flag!r}"


def test_readme_parsing():
    text = "# A\n```bash\n# a comment\nx --a \\\n  'b c'   # trailing\n\ny\n```\n```text\nz\n```\n"
    assert [(c.section, c.text, c.line) for c in readme_commands(text)] == [
        ("A", "x --a 'b c'", 4),
        ("A", "y", 7),
    ]
    assert shrink(".venv/bin/mmjax bench --config configs/coca.py:size=bench --steps 10") == (
        ".venv/bin/mmjax bench --config configs/coca.py:size=tiny --steps 1"
    )
    assert shrink("bash launch/local.sh test") == "bash launch/local.sh test --collect-only -q"
    assert shrink(
        ".venv/bin/python -m mmjax.tools.dryrun --config configs/coca.py:size=large,batch=1024"
        " --devices 64"
    ) == (  # fmt: skip
        ".venv/bin/python -m mmjax.tools.dryrun --config configs/coca.py:size=tiny,batch=16 --devices 4"
    )
    assert shrink("x -m mmjax.train --workdir r").endswith(" ".join(TRAIN_SHRINK))
    assert shrink(".venv/bin/mmjax train --workdir r").endswith(" ".join(TRAIN_SHRINK))
    assert shrink(".venv/bin/mmjax tokenizer train csv:a.csv") == (
        ".venv/bin/mmjax tokenizer train csv:a.csv"
    )
    assert shrink("bash launch/local.sh --config.seed=1").endswith(" ".join(TRAIN_SHRINK))


def install_stamps(tree: Path) -> dict[str, str]:
    """The stamps launch/local.sh writes into the venv once it has installed this tree."""
    script = (tree / "launch" / "local.sh").read_text()
    pins = re.search(r'^openclip_pins="([^"]*)"', script, re.M)[1]
    want = hashlib.sha256((tree / "pyproject.toml").read_bytes()).hexdigest()
    openclip = hashlib.sha256(f"{want} {pins}".encode()).hexdigest()
    return {".mmjax-installed": want, ".mmjax-openclip": openclip}


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path, cache_dir):
    tree = fresh_tree(tmp_path / "mmjax")
    # The set-up command's venv: this interpreter's (launch/local.sh finds it installed).
    venv = Path(sys.prefix)
    for stamp, want in install_stamps(tree).items():  # Else launch/local.sh would reinstall.
        assert (venv / stamp).is_file() and (venv / stamp).read_text().strip() == want, (
            f"{venv} is not installed from this tree: run `bash launch/local.sh test` first"
        )
    (tree / ".venv").symlink_to(venv)
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=FAST_COMPILE,
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        MMJAX_MALLOC_TUNING="0",
        PYTHONPATH=str(tree),  # The copy's package, also for console scripts.
    )
    for key in ("MMJAX_COORDINATOR", "MMJAX_NUM_PROCESSES", "MMJAX_PROCESS_ID"):
        env.pop(key, None)
    timings = []
    for command in readme_commands(README.read_text()):
        for path, write in FIXTURES.items():
            if path in command.text and not (tree / path).exists():
                write(tree)
        shrunk = shrink(command.text)
        start = time.perf_counter()
        proc = subprocess.run(
            ["bash", "-c", shrunk],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        timings.append((time.perf_counter() - start, command.text))
        assert proc.returncode == 0, (
            f"README.md:{command.line} ({command.section}) exited {proc.returncode}:\n"
            f"{shrunk}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    slowest = sorted(timings, reverse=True)[:5]
    print("slowest README commands:", *(f"{s:6.1f}s {c[:90]}" for s, c in slowest), sep="\n")

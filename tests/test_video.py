"""Video input: the procedural clip corpus, clips read from files, the video tower's sharding,
and a short training run whose captions depend on the order of the frames."""

import io
import pickle
import re
import textwrap

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmjax.data.clips import frame_files, load_clip, sample_indices
from mmjax.data.csv_source import CsvSource
from mmjax.data.pipeline import eval_batches, train_batches
from mmjax.data.preprocess import ImageOptions, load_image
from mmjax.data.records import BadSample
from mmjax.data.shapes_video import MOTIONS, OPPOSITE, ShapesVideoSource, all_captions
from mmjax.data.sources import make_source
from mmjax.data.stats import COLUMN
from mmjax.text.sentencepiece import train_tokenizer
from tests.runs import run_with_devices

T = 4


def _data_config(**overrides):
    values = dict(seed=0, train_examples=100, eval_examples=20, image_key="filepath")
    values.update(caption_key="caption", **overrides)
    return ml_collections.ConfigDict(values)


def _centre_and_area(clip: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: the shape's centroid x, y and its pixel count (pixels far from the
    background, the per-channel median of the clip)."""
    pixels = clip.astype(np.int16)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    mask = np.abs(pixels - background).max(axis=-1) > 60  # [T, S, S]
    ys, xs = np.mgrid[: clip.shape[1], : clip.shape[2]]
    area = mask.sum(axis=(1, 2))
    return (mask * xs).sum(axis=(1, 2)) / area, (mask * ys).sum(axis=(1, 2)) / area, area


def _motion_seen(clip: np.ndarray) -> str:
    """The motion a clip shows, read off the pixels (first vs last frame)."""
    x, y, area = _centre_and_area(clip)
    dx, dy, growth = x[-1] - x[0], y[-1] - y[0], area[-1] / area[0]
    if growth > 1.8 or growth < 1 / 1.8:
        return "growing" if growth > 1 else "shrinking"
    if abs(dx) > abs(dy):
        return "moving right" if dx > 0 else "moving left"
    return "moving down" if dy > 0 else "moving up"  # Image y grows downward.


def _motion_said(caption: str) -> str | None:
    return next((m for m in MOTIONS if caption.endswith(m)), None)


# --- the corpus ---------------------------------------------------------------------------


def test_corpus_is_deterministic_and_captions_name_the_motion():
    source = ShapesVideoSource(seed=3, image_size=16, frames=T)
    forward = [source[i]["image"].tobytes() for i in range(8)]
    again = ShapesVideoSource(seed=3, image_size=16, frames=T)
    assert [again[i]["image"].tobytes() for i in reversed(range(8))] == forward[::-1]
    assert len(set(forward)) == 8
    clone = pickle.loads(pickle.dumps(source))  # grain worker processes
    assert clone[5]["caption"] == source[5]["caption"]
    other_seed = ShapesVideoSource(seed=4, image_size=16, frames=T)
    assert other_seed[0]["image"].tobytes() != forward[0]
    eval_split = ShapesVideoSource(split="eval", seed=3, image_size=16, frames=T)
    assert eval_split[0]["image"].tobytes() != forward[0]

    record = source[0]
    assert record["image"].dtype == np.uint8 and record["image"].shape == (T, 16, 16, 3)
    assert record["key"] == "shapes_video/train/0"
    seen_motions = set()
    for i in range(60):
        attributes = source.attributes(i)
        caption = source[i]["caption"]
        assert caption == source.caption(i) in all_captions()
        assert caption == f"a {attributes['colour']} {attributes['shape']} {attributes['motion']}"
        seen_motions.add(_motion_said(caption))
    assert seen_motions == set(MOTIONS)
    assert len(all_captions()) == len(set(all_captions())) == 8 * 4 * 6


def test_reversed_clips_show_the_opposite_motion():
    """The pixels show what the caption says; played backwards they show the opposite
    motion (a 'moving left' clip reversed moves right), so only frame order tells them
    apart."""
    source = ShapesVideoSource(split="eval", seed=0, image_size=24, frames=T)
    checked = {m: 0 for m in MOTIONS}
    for i in range(48):
        clip, caption = source[i]["image"], source[i]["caption"]
        motion = _motion_said(caption)
        assert _motion_seen(clip) == motion, (i, caption)
        assert _motion_seen(clip[::-1]) == OPPOSITE[motion], (i, caption)
        checked[motion] += 1
    assert min(checked.values()) >= 3, checked
    # The frames as a set carry no order: sorted frames are the same for both directions.
    left = next(i for i in range(48) if source.attributes(i)["motion"] == "moving left")
    x, _, _ = _centre_and_area(source[left]["image"])
    assert np.all(np.diff(x) < 0) and np.all(np.diff(x[::-1]) > 0)


def test_make_source_builds_clip_sources_and_refuses_mismatches():
    data = _data_config()
    source = make_source("shapes_video", split="eval", data=data, image_size=16, frames=5)
    assert isinstance(source, ShapesVideoSource) and len(source) == 20
    assert source[0]["image"].shape == (5, 16, 16, 3)
    with pytest.raises(ValueError, match="input_kind='video'"):
        make_source("shapes_video", split="train", data=data, image_size=16, frames=0)
    with pytest.raises(ValueError, match="holds still images"):
        make_source("shapes", split="train", data=data, image_size=16, frames=T)
    # Captions only (e.g. training a tokenizer): no frame count needed.
    captions = make_source("shapes_video", split="train", data=data, image_size=16, frames=None)
    assert captions.caption(0) == source.__class__(seed=0, frames=4).caption(0)


# --- clips from files ---------------------------------------------------------------------


def _png(frame: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A CSV of clips: a folder of 12 PNG frames, an 8-frame .npy stack, a 6-frame GIF, and
    a too-short folder, a too-short .npy and a missing folder."""
    root = tmp_path_factory.mktemp("clips")
    long = ShapesVideoSource(split="eval", seed=1, image_size=32, frames=12)
    moving = [i for i in range(40) if long.attributes(i)["motion"].startswith("moving")]
    clips = {name: long[i] for name, i in zip(("folder", "npy", "gif"), moving)}
    folder = root / "folder_clip"
    folder.mkdir()
    # frame_2 sorts before frame_10 (numbers compare as numbers); other files are ignored.
    for i, frame in enumerate(clips["folder"]["image"]):
        (folder / f"frame_{i}.png").write_bytes(_png(frame))
    (folder / "notes.txt").write_text("not a frame")
    (folder / ".hidden.png").write_bytes(_png(clips["folder"]["image"][0]))
    np.save(root / "stack.npy", clips["npy"]["image"][:8])
    gif_frames = [Image.fromarray(f) for f in clips["gif"]["image"][:6]]
    gif_frames[0].save(root / "clip.gif", save_all=True, append_images=gif_frames[1:])
    short = root / "short_clip"
    short.mkdir()
    for i, frame in enumerate(clips["folder"]["image"][:2]):
        (short / f"{i}.png").write_bytes(_png(frame))
    np.save(root / "short.npy", clips["npy"]["image"][:3])
    rows = [
        ("folder_clip", clips["folder"]["caption"]),
        ("stack.npy", clips["npy"]["caption"]),
        ("clip.gif", clips["gif"]["caption"]),
        ("short_clip", "a clip of two frames"),
        ("short.npy", "a stack of three frames"),
        ("missing_clip", "a clip that is not there"),
    ]
    csv_path = root / "clips.csv"
    csv_path.write_text("filepath,caption\n" + "".join(f"{p},{c}\n" for p, c in rows))
    return dict(root=root, csv=csv_path, clips=clips)


def test_sampling_and_frame_order():
    assert sample_indices(4, 4) == [0, 1, 2, 3]
    assert sample_indices(12, 4) == [1, 4, 7, 10]  # the middle of each of 4 equal spans
    assert sample_indices(8, 4) == [1, 3, 5, 7]
    with pytest.raises(BadSample, match="too_few_frames"):
        sample_indices(3, 4)


def test_clips_load_from_a_folder_a_npy_stack_and_a_gif(clip_files):
    root, clips = clip_files["root"], clip_files["clips"]
    names = frame_files(str(root / "folder_clip"))
    assert names == [f"frame_{i}.png" for i in range(12)]
    source = make_source(
        f"csv:{clip_files['csv']}", split="eval", data=_data_config(), image_size=16, frames=T
    )
    assert isinstance(source, CsvSource)
    options = ImageOptions(image_size=16, train=False, frames=T)
    frame_options = ImageOptions(image_size=16, train=False)

    # Folder: the sampled frames, each exactly as the image path would preprocess it.
    record = source[0]
    assert isinstance(record["image"], list) and len(record["image"]) == T  # Only 4 read.
    clip = load_clip(record["image"], options)
    expected = [load_image(_png(clips["folder"]["image"][i]), frame_options) for i in (1, 4, 7, 10)]
    np.testing.assert_array_equal(clip, np.stack(expected))
    # .npy stack of 8: frames 1, 3, 5, 7, resized as decoded arrays are.
    clip = load_clip(source[1]["image"], options)
    expected = [load_image(clips["npy"]["image"][i], frame_options) for i in (1, 3, 5, 7)]
    np.testing.assert_array_equal(clip, np.stack(expected))
    # GIF (palette-quantised): 6 frames -> 0, 2, 3, 5; the motion survives.
    clip = load_clip(source[2]["image"], options)
    assert clip.shape == (T, 16, 16, 3) and clip.dtype == np.uint8
    assert _motion_seen(clip) == _motion_said(clips["gif"]["caption"])

    for index in (3, 4):  # Too short: 2 frame files, 3 stacked frames.
        with pytest.raises(BadSample, match="too_few_frames"):
            load_clip(source[index]["image"], options)


def test_a_clip_shares_one_crop_and_jitter_over_its_frames():
    still = ShapesVideoSource(seed=2, image_size=32, frames=T)[0]["image"][0]
    clip_bytes = [_png(still)] * 6  # A static clip: every output frame must be the same.
    options = ImageOptions(
        image_size=16, train=True, frames=T, crop_scale=(0.3, 0.6), color_jitter=0.4
    )
    outputs = [load_clip(clip_bytes, options, np.random.default_rng(s)) for s in range(3)]
    for clip in outputs:
        assert all(np.array_equal(clip[0], frame) for frame in clip[1:])
    assert not np.array_equal(outputs[0][0], outputs[1][0])  # ...but differs between draws.


def test_short_and_missing_clips_are_skipped_and_counted(clip_files, tmp_path):
    source = make_source(
        f"csv:{clip_files['csv']}", split="eval", data=_data_config(), image_size=16, frames=T
    )
    tokenizer = train_tokenizer(
        [source.caption(i) for i in range(len(source))] * 20, tmp_path / "tok.model", 48
    )
    options = ImageOptions(image_size=16, train=False, frames=T)
    batches = list(
        eval_batches(
            source, tokenizer, global_batch_size=4, context_length=12, image_options=options
        )
    )
    images = np.concatenate([b["images"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    counts = sum(b["counts"] for b in batches)
    assert images.shape == (8, T, 16, 16, 3)  # Padded to two batches of 4.
    assert valid.tolist() == [True, True, True, False, False, False, False, False]
    assert not images[3:6].any()  # Bad rows are blank clips...
    np.testing.assert_array_equal(images[6:], images[:2])  # ...padding repeats earlier ones.
    assert counts[0, COLUMN["too_few_frames"]] == 2
    assert counts[0, COLUMN["missing_file"]] == 1
    assert counts[0, COLUMN["used"]] == 3

    train = train_batches(
        [source],
        tokenizer,
        global_batch_size=6,
        context_length=12,
        seed=0,
        image_options=ImageOptions(image_size=16, train=True, frames=T),
        num_threads=0,
        prefetch=0,
    )
    batch = next(train)
    assert batch["images"].shape == (6, T, 16, 16, 3)
    counts = batch["counts"].sum(axis=0)  # Per-row counters, summed.
    assert counts[0, COLUMN["used"]] == 6
    assert counts[0, COLUMN["too_few_frames"]] >= 2  # Replaced, and counted.
    assert counts[0, COLUMN["missing_file"]] >= 1


def test_counts_saved_before_the_clip_reason_existed_still_restore():
    from mmjax.data.stats import COUNTERS, DataStats

    # Checkpoints written before too_few_frames (and truncated_member) were counted.
    old_counters = [c for c in COUNTERS if c not in ("too_few_frames", "truncated_member")]
    counts = [[0] * (len(old_counters) - 2) + [5, 2]]
    saved = {"sources": ["shapes"], "counters": old_counters, "counts": counts}
    stats = DataStats(["shapes"])
    stats.load_json(saved)
    assert stats.metrics()["data/used"] == 5 and stats.metrics()["data/truncated_captions"] == 2
    assert stats.metrics()["data/skipped_too_few_frames"] == 0
    assert stats.metrics()["data/skipped_truncated_member"] == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.data.train=shapes"], "data.train: .*shapes holds still images"),
        (["--config.model.input_kind=image"], "data.train: .*set model.input_kind='video'"),
    ],
)
def test_clip_and_image_sources_must_match_the_model(overrides, message, tmp_path, capsys):
    from mmjax import train

    args = ["--config", "configs/video.py:size=tiny", "--workdir", str(tmp_path), *overrides]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err


# --- the video tower ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant, tokens",
    [
        (dict(), T + T * 16),  # temporal tokens, then each frame's 16 caption tokens
        ({"video.layers": 0}, T + T * 16),  # time embedding and pooling only
        (
            {"vision.pool": "shared_queries", "vision.pool_width": 32, "vision.pool_heads": 4},
            T + T * 16,
        ),
        ({"decoder.fusion": "late"}, None),  # the frame encoder gives no caption tokens
        (
            {"vision.encoder": "resnet", "vision.resnet_blocks": (1, 1), "vision.resnet_width": 8},
            T + T * 16,
        ),
    ],
)
def test_video_tower_keeps_the_image_towers_contract(variant, tokens):
    """(pooled [B, W], tokens [B, M, W] or None) for every frame encoder and fusion; a clip
    of another length is refused naming the shape."""
    import jax
    import jax.numpy as jnp

    from mmjax.models.coca import CoCa
    from mmjax.models.config import SIZES, ModelConfig
    from mmjax.models.registry import image_tower

    cfg = ModelConfig.sized(
        "tiny", {"input_kind": "video", "video.frames": T, "image_size": 16, **variant}
    )
    cfg.validate()
    clips = jnp.zeros((2, T, 16, 16, 3), jnp.uint8)
    tower = image_tower(cfg)
    variables = jax.eval_shape(tower.init, jax.random.PRNGKey(0), clips)
    pooled, out = jax.eval_shape(tower.apply, variables, clips)
    assert pooled.shape[0] == 2 and pooled.ndim == 2
    if tokens is None:
        assert out is None
    else:
        assert out.shape == (2, tokens, pooled.shape[1])
    model = CoCa(cfg)
    text = jnp.zeros((2, cfg.context_length), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), clips, text)
    logits = jax.eval_shape(model.apply, params, clips, text)["logits"]
    assert logits.shape == (2, cfg.context_length - 1, cfg.vocab_size)
    with pytest.raises(ValueError, match=r"\(2, 3, 16, 16, 3\).*video\.frames=4"):
        jax.eval_shape(model.apply, params, clips[:, :3], text)


# --- sharding -----------------------------------------------------------------------------

_SHARDED = """
import json
import flax.linen as nn
import jax, numpy as np
from mmjax.runtime import sharding as shd
from mmjax.training.losses import caption_loss
from mmjax.models.coca import CoCa
from mmjax.models.config import SIZES, ModelConfig
from mmjax.training.sharded_losses import sharded_contrastive_loss
from mmjax.training.step import batch_shardings
from mmjax.training.state import dummy_batch

assert jax.device_count() == 8
cfg = ModelConfig.sized("tiny", {"input_kind": "video", "video.frames": 4, "image_size": 16,
    "context_length": 10, "vision.layers": 1, "text.layers": 1, "decoder.layers": 1})
model = CoCa(cfg)
rng = np.random.default_rng(0)
clips = rng.integers(0, 256, (8, 4, 16, 16, 3), dtype=np.uint8)
tokens = rng.integers(3, cfg.vocab_size, (8, 10)).astype(np.int32)
tokens[:, 0], tokens[::2, 6:] = 1, 0
boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_batch(model)))

def draw(path, a):  # Weights from numpy (no init to compile); both meshes get these values.
    names = [getattr(k, "key", "") for k in path]
    shape = a.shape[1:] if "layers" in names else a.shape  # Scanned: a leading layer axis.
    if names[-1] == "scale" and len(shape) == 1:  # LayerNorm
        return np.ones(a.shape, a.dtype)
    if names[-1].endswith("bias"):
        return rng.normal(0, 0.02, a.shape).astype(a.dtype)
    return rng.normal(0, shape[0] ** -0.5 if shape else 1, a.shape).astype(a.dtype)

params = jax.tree_util.tree_map_with_path(draw, nn.unbox(boxed["params"]))

def spec(sharding):
    return [list(e) if isinstance(e, tuple) else e for e in sharding.spec]

out = {}
for name, sizes, devices in (
    ("one", {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
    ("eight", {"data": 2, "fsdp": 2, "tensor": 2}, None),
):
    mesh = shd.make_mesh(sizes, devices)
    rules = shd.DEFAULT_RULES
    on_mesh = jax.device_put(params, shd.logical_shardings(boxed["params"], mesh, rules))
    rows = batch_shardings(mesh, rules, cfg)
    batch_axes = shd.batch_mesh_axes(rules) if name == "eight" else ()

    def loss(p, images, tokens):
        o = model.apply({"params": p}, images, tokens)
        con = sharded_contrastive_loss(
            "softmax", o["image_emb"], o["text_emb"], o["scale"], o["bias"], batch_axes=batch_axes
        )
        cap, _ = caption_loss(o["logits"], tokens[:, 1:], 0)
        return con, cap, o["image_emb"], o["logits"]

    images = jax.device_put(clips, rows["images"])
    text = jax.device_put(tokens, rows["tokens"])
    with shd.activate(mesh, rules):
        con, cap, emb, logits = jax.jit(loss)(on_mesh, images, text)
    video = on_mesh["image_encoder"]
    out[name] = dict(
        con=float(con), cap=float(cap), emb=np.asarray(emb).tolist(),
        logits=np.asarray(logits)[:, :3].tolist(),
        images_spec=spec(rows["images"]), logits_spec=spec(logits.sharding),
        shard_shapes=sorted({tuple(s.data.shape) for s in images.addressable_shards}),
        frame_kernel=spec(video["frame_encoder"]["patch_embed"]["kernel"].sharding),
        time_embed=spec(video["time_embed"].sharding),
    )
print(json.dumps(out))
"""


def test_clip_batches_shard_like_images():
    """On data=2 x fsdp=2 x tensor=2 (8 forced CPU devices) the clip batch is split over
    data x fsdp like an image batch, and the sharded forward and losses equal one device's."""
    out = run_with_devices(textwrap.dedent(_SHARDED))
    one, eight = out["one"], out["eight"]
    assert eight["images_spec"] == [["data", "fsdp"], None, None, None, None]
    assert eight["shard_shapes"] == [[2, T, 16, 16, 3]]  # 2 clips per device, whole clips.
    assert eight["logits_spec"][0] == ["data", "fsdp"]
    assert eight["frame_kernel"] == [None, "fsdp"] and eight["time_embed"] == [None, "fsdp"]
    assert one["shard_shapes"] == [[8, T, 16, 16, 3]]
    for key in ("con", "cap"):
        assert abs(eight[key] - one[key]) < 1e-5, (key, eight[key], one[key])
    np.testing.assert_allclose(eight["emb"], one["emb"], atol=1e-5)
    np.testing.assert_allclose(eight["logits"], one["logits"], atol=1e-4)


# --- a short training run -----------------------------------------------------------------

# Small enough to train in well under a minute on 2 cores: 16 px frames in 8 px patches (the
# position of the shape inside a patch is in the patch embedding from the first step, which
# makes direction learnable in a few hundred steps), 4 caption queries per frame.
TRAIN_STEPS = 300
EVAL_CLIPS = 128
TRAIN_OVERRIDES = [
    "model.vision.patch_size=8",
    "model.vision.caption_queries=4",
    "model.context_length=10",
    "model.scan_layers=False",  # Compiles in 2/3 of the time at this depth.
    "log_every=100",
    f"eval_every={TRAIN_STEPS}",
    f"checkpoint_every={TRAIN_STEPS}",
    "optimizer.warmup_steps=20",
    "data.train_examples=4000",
    f"data.eval_examples={EVAL_CLIPS}",
    "eval.batch_size=64",
    f"eval.caption_examples={EVAL_CLIPS}",
    # Every evaluator type on clips (a few examples each: their code paths, on video).
    "evals.captioning.examples=64",
    "evals.zeroshot.examples=64",
    "evals.retrieval={'type': 'retrieval', 'examples': 64}",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from mmjax.runtime.config import load_config
    from mmjax.tools.train import make_trainer

    config = load_config(
        f"configs/video.py:size=tiny,steps={TRAIN_STEPS},batch=32,image=16", TRAIN_OVERRIDES
    )
    workdir = tmp_path_factory.mktemp("video_run")
    trainer = make_trainer(config, workdir)
    metrics = trainer.fit()
    yield trainer, metrics
    trainer.close()


@pytest.mark.slow
def test_training_on_clips_learns_the_direction_from_frame_order(trained):
    """Held-out clips are captioned with the right motion far above chance (1/6), and playing
    a clip backwards (or shuffling its frames) changes the embedding and flips the motion the
    caption names: the model reads the order of the frames, not just the frames."""
    trainer, metrics = trained
    samples = trainer.evaluator.default.last_samples  # (reference, greedy caption) pairs
    assert len(samples) == EVAL_CLIPS
    right = [_motion_said(ref) == _motion_said(gen) for ref, gen in samples]
    accuracy = float(np.mean(right))
    print(f"direction accuracy {accuracy:.3f} on {len(samples)} held-out clips; {metrics}")
    assert accuracy >= 0.6, samples[:10]  # Measured 0.99 (chance 0.17).
    # The default evaluation and every named evaluator ran on clips.
    assert metrics["eval/num_examples"] == EVAL_CLIPS and metrics["eval/skipped"] == 0
    assert metrics["eval/i2t_r5"] > 0.3  # Chance 5/128; measured 0.78.
    for key in ("retrieval/i2t_r1", "captioning/bleu4", "captioning/cider", "zeroshot/accuracy"):
        assert np.isfinite(metrics[f"eval/{key}"]), key
    assert metrics["eval/retrieval/num_examples"] == 64

    from mmjax.inference.generate import GenerateOptions
    from mmjax.runtime import sharding as shd

    ctx, params = trainer.evaluator.context, trainer.state.params
    source = trainer.evaluator.default.source
    clips = np.stack([source[i]["image"] for i in range(64)])  # One eval batch: no recompile.
    truth = [source.attributes(i)["motion"] for i in range(64)]
    caption = ctx.captioner(GenerateOptions())

    def run(batch):
        with shd.activate(ctx.mesh, ctx.rules):
            batch = ctx.to_global(np.ascontiguousarray(batch))
            emb = np.asarray(ctx.embed_images(params, batch))
            tokens = np.asarray(caption(params, batch, None))
        return emb, [_motion_said(text) for text in ctx.tokenizer.decode_batch(tokens)]

    emb, said = run(clips)
    emb_reversed, said_reversed = run(clips[:, ::-1])
    emb_shuffled, _ = run(clips[:, [2, 0, 3, 1]])
    for other in (emb_reversed, emb_shuffled):
        cosine = np.sum(emb * other, axis=1)
        assert np.median(cosine) < 0.99, cosine
    assert np.mean([s == t for s, t in zip(said, truth)]) >= 0.6
    flipped = np.mean([s == OPPOSITE[t] for s, t in zip(said_reversed, truth)])
    print(f"reversed clips captioned with the opposite motion: {flipped:.3f}")
    assert flipped >= 0.6, list(zip(truth, said_reversed))[:10]


@pytest.mark.slow
def test_predictor_reads_clips_from_arrays_folders_and_stack_files(trained, tmp_path, capsys):
    from mmjax.inference.predictor import BadImage, Predictor

    trainer, _ = trained
    predictor = Predictor.from_workdir(trainer.workdir, warn=None)
    source = trainer.evaluator.default.source
    clips = [source[i]["image"] for i in range(3)]
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(clips[1]):
        (folder / f"{i:03d}.png").write_bytes(_png(frame))
    np.save(tmp_path / "clip.npy", clips[2])
    emb = predictor.embed_images([clips[0], folder, tmp_path / "clip.npy"], batch_size=4)
    expected = predictor.embed_images(clips, batch_size=4)
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    with pytest.raises(BadImage, match="too_few_frames"):
        predictor.embed_images([clips[0][:2]])

    # The caption CLI takes clip folders and stack files as its IMAGE arguments.
    from mmjax.tools import caption

    assert (
        caption.main(["--workdir", str(trainer.workdir), str(folder), str(tmp_path / "clip.npy")])
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(folder), str(tmp_path / "clip.npy")]
    said = [_motion_said(line.split("\t")[1]) for line in lines]
    assert said == [source.attributes(i)["motion"] for i in (1, 2)], lines

"""model.decoder.fusion = early | late (mmjax/models/fusion.py) against the cross-attention default.

Random-init tiny models (f32). Masks are checked on the mask function and by perturbation
(which outputs may move when one input changes); decoding through the KV cache (the image
prefix enters the self-attention cache with BOS) against full re-runs of the model; a few
train steps; and 8 forced CPU devices (data=2, fsdp=2, tensor=2) against one, in one
subprocess for both fusions.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from mmjax.inference.generate import GenerateOptions, _initial_cache, make_generate_fn
from mmjax.models.coca import CoCa
from mmjax.models.config import SIZES, ModelConfig
from mmjax.models.flops import forward_flops_per_example
from mmjax.models.layers import prefix_lm_mask
from mmjax.models.vit import ImageEncoder
from mmjax.runtime.config import load_config
from mmjax.tools.sweep import load_sweep, variant_overrides
from mmjax.training.losses import caption_loss, contrastive_loss
from mmjax.training.objective import loss_and_grads
from tests.runs import run_with_devices
from tests.test_flops import MID, _flops
from tests.test_generate import BATCH, naive_beam, naive_greedy

PAD, BOS = 0, 1
FUSIONS = ("early", "late")
EXACT = dict(rtol=0, atol=1e-6)  # Masked keys get zero weight: "unchanged" is near exact.


def _differs(a, b, axis=-1):
    """Per-row: does some entry move by more than float noise?"""
    return np.abs(np.asarray(a) - np.asarray(b)).max(axis=axis) > 1e-4


# On top of `tiny`: one ViT and one text-encoder layer keep compiles short; the decoder keeps
# its two layers, so the masks are checked through a stack (layer 2 reads what layer 1 mixed).
SMALLER = {"vision.layers": 1, "text.layers": 1, "vision.caption_queries": 8}


def _config(fusion: str) -> ModelConfig:
    cfg = ModelConfig.sized("tiny", {"decoder.fusion": fusion, **SMALLER})
    cfg.validate()
    return cfg


@functools.cache
def _early_params():
    """One random init (one compile) for both fusions: late's parameters are early's
    without the caption pooler."""
    cfg = _config("early")
    images = np.zeros((1, cfg.image_size, cfg.image_size, 3), np.uint8)
    tokens = np.zeros((1, cfg.context_length), np.int32)
    return nn.unbox(jax.jit(CoCa(cfg).init)(jax.random.PRNGKey(0), images, tokens)["params"])


def _outputs(module: CoCa, images, tokens) -> dict:
    """The model's outputs plus what the decoder reads about the image (XLA computes the
    image tower once)."""
    pooled, _ = module.image_encoder(images)
    return dict(module(images, tokens), caption=module.encode_image(images)[1], pooled=pooled)


@functools.cache
def _setup(fusion: str) -> dict:
    cfg = _config(fusion)
    model = CoCa(cfg)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    tokens = rng.integers(3, cfg.vocab_size, (BATCH, cfg.context_length)).astype(np.int32)
    tokens[:, 0] = BOS
    params = _early_params()
    if fusion == "late":
        image_encoder = {k: v for k, v in params["image_encoder"].items() if k != "caption_pool"}
        params = dict(params, image_encoder=image_encoder)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, tokens)["params"]
    shapes = jax.tree.map(lambda x: x.shape, (nn.unbox(boxed), params))
    assert shapes[0] == shapes[1]
    apply = jax.jit(lambda p, i, t: model.apply({"params": p}, i, t, method=_outputs))
    return dict(
        cfg=cfg,
        model=model,
        boxed=boxed,
        params=params,
        images=images,
        tokens=tokens,
        apply=apply,
        # What tests.test_generate's naive decoders re-run every step, in batches of BATCH
        # (naive_beam feeds BATCH * beams rows): one compile serves every caller.
        forward=lambda p, i, t: np.concatenate(
            [
                np.asarray(apply(p, i[r : r + BATCH], t[r : r + BATCH])["logits"])
                for r in range(0, len(i), BATCH)
            ]
        ),
    )


@pytest.fixture(scope="module", params=FUSIONS)
def setup(request):
    return _setup(request.param)


# --- Structure and masks -------------------------------------------------------------------


def test_prefix_lm_mask():
    n, t = 3, 4
    mask = np.asarray(prefix_lm_mask(n + t, n + t, prefix=n))[0, 0]
    assert mask.shape == (n + t, n + t)
    # Image queries: every image key, no text key.
    assert mask[:n, :n].all() and not mask[:n, n:].any()
    # Text queries: every image key, the text causally.
    assert mask[n:, :n].all()
    np.testing.assert_array_equal(mask[n:, n:], np.tril(np.ones((t, t), bool)))
    # prefix 0 (the KV cache's default) is the causal mask, at any offset.
    causal = np.asarray(nn.make_causal_mask(jnp.ones((1, n + t)), dtype=bool))
    np.testing.assert_array_equal(np.asarray(prefix_lm_mask(n + t, n + t)), causal)
    # The cache's rows for queries at a later offset are the rows of the full mask.
    np.testing.assert_array_equal(
        np.asarray(prefix_lm_mask(2, n + t, offset=n + 1, prefix=n))[0, 0], mask[n + 1 : n + 3]
    )


def test_shapes_and_parameters(setup):
    s = setup
    cfg, params = s["cfg"], s["params"]
    out = s["apply"](params, s["images"], s["tokens"])
    assert out["logits"].shape == (BATCH, cfg.context_length - 1, cfg.vocab_size)
    assert out["image_emb"].shape == out["text_emb"].shape == (BATCH, cfg.embed_dim)
    decoder = params["decoder"]
    assert set(decoder) == {"image_to_text", "blocks", "ln_final", "lm_head"}
    assert set(decoder["blocks"]["layers"]) == {"ln_attn", "attn", "ln_mlp", "mlp"}
    assert decoder["blocks"]["layers"]["attn"]["qkv_kernel"].shape[0] == cfg.decoder.layers
    assert decoder["image_to_text"]["kernel"].shape == (cfg.vision.width, cfg.text.width)
    # Late builds no caption pooler: the decoder reads the pooled vector only.
    assert ("caption_pool" in params["image_encoder"]) == (cfg.decoder.fusion == "early")
    assert s["boxed"]["decoder"]["image_to_text"]["kernel"].names == ("embed", "joint")
    caption = out["caption"]
    if cfg.decoder.fusion == "late":
        # The tower returns no caption tokens; encode_image hands over the pooled vector.
        _, tower_tokens = jax.eval_shape(
            functools.partial(s["model"].apply, method=lambda m, i: m.image_encoder(i)),
            {"params": params},
            s["images"],
        )
        assert tower_tokens is None
        np.testing.assert_array_equal(np.asarray(caption), np.asarray(out["pooled"])[:, None])
    else:
        assert caption.shape == (BATCH, cfg.vision.caption_queries, cfg.vision.width)


@pytest.mark.parametrize("j", [1, 6])
def test_text_positions_never_see_later_text(setup, j):
    s = setup
    logits = np.asarray(s["forward"](s["params"], s["images"], s["tokens"]))
    changed = s["tokens"].copy()
    changed[:, j] = 3 + (changed[:, j] - 2) % 253  # Another real token in every row.
    logits2 = np.asarray(s["forward"](s["params"], s["images"], changed))
    # logits[:, i] predicts tokens[:, i + 1] from tokens[:, :i + 1].
    np.testing.assert_allclose(logits2[:, :j], logits[:, :j], **EXACT)
    assert np.all(_differs(logits2[:, j], logits[:, j]))


def test_padding_after_eos_is_invisible(setup):
    """As with cross-attention: changing what PAD embeds moves no logit up to EOS."""
    s = setup
    tokens = s["tokens"].copy()
    eos_at = [3, 5, 7, 9, 11, 13]
    for row, e in enumerate(eos_at):
        tokens[row, e + 1 :] = PAD
    params = jax.tree.map(lambda x: x, s["params"])
    table = params["text_encoder"]["token_embed"]["embedding"]
    noise = 5.0 * jax.random.normal(jax.random.PRNGKey(0), table.shape[1:])
    params["text_encoder"]["token_embed"]["embedding"] = table.at[PAD].add(noise)
    logits = np.asarray(s["forward"](s["params"], s["images"], tokens))
    logits2 = np.asarray(s["forward"](params, s["images"], tokens))
    for row, e in enumerate(eos_at):
        np.testing.assert_allclose(logits2[row, : e + 1], logits[row, : e + 1], **EXACT)
        assert _differs(logits2[row, e + 1 :], logits[row, e + 1 :], axis=None)


def _decoder_with_hidden(module, features, image_tokens):
    return module.decoder(features, image_tokens)


def test_early_image_positions_see_all_image_and_no_text():
    """On the decoder alone: the stack's output at the image positions depends on every image
    token and on no text feature; text positions see the image and earlier text."""
    s = _setup("early")
    cfg = s["cfg"]
    n, t = cfg.vision.caption_queries, cfg.context_length - 1
    run = jax.jit(
        functools.partial(
            s["model"].apply,
            method=_decoder_with_hidden,
            capture_intermediates=lambda mdl, _: mdl.path == ("decoder", "blocks"),
        )
    )

    def hidden(features, image_tokens):
        _, state = run({"params": s["params"]}, features, image_tokens)
        (x,) = state["intermediates"]["decoder"]["blocks"]["__call__"]
        return np.asarray(x)

    rng = np.random.default_rng(1)
    features = rng.normal(size=(BATCH, t, cfg.text.width)).astype(np.float32)
    image = rng.normal(size=(BATCH, n, cfg.vision.width)).astype(np.float32)
    base = hidden(features, image)
    assert base.shape == (BATCH, n + t, cfg.text.width)

    j = 4  # A text position.
    text_changed = features.copy()
    text_changed[:, j] += 3.0
    out = hidden(text_changed, image)
    np.testing.assert_allclose(out[:, : n + j], base[:, : n + j], **EXACT)
    assert np.all(_differs(out[:, n + j], base[:, n + j]))

    image_changed = image.copy()
    image_changed[:, -1] += 3.0  # The last image token ...
    out = hidden(features, image_changed)
    assert np.all(_differs(out[:, 0], base[:, 0]))  # ... reaches the first image position
    assert np.all(_differs(out[:, n], base[:, n]))  # and the first text position.


@functools.cache
def _logits_with_pooled(fusion: str):
    """Full-model logits with the image tower's pooled vector replaced by `pooled`; the tower
    still runs on the images, so every other path from the pixels stays open."""
    model = _setup(fusion)["model"]

    def run(params, images, tokens, pooled):
        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if isinstance(context.module, ImageEncoder) and context.method_name == "__call__":
                return pooled, out[1]
            return out

        with nn.intercept_methods(interceptor):
            return model.apply({"params": params}, images, tokens)["logits"]

    return jax.jit(run)


def test_late_image_reaches_the_decoder_only_through_the_pooled_vector(setup):
    """With the pooled vector held fixed, other images give the same logits under late fusion
    (nothing finer than the pooled vector is read); under early fusion they do not (the
    caption tokens carry the detail), which shows the check can fail."""
    s = setup
    run = _logits_with_pooled(s["cfg"].decoder.fusion)
    pooled = np.random.default_rng(2).normal(size=(BATCH, s["cfg"].vision.width)).astype(np.float32)
    other_images = 255 - s["images"]
    logits = np.asarray(run(s["params"], s["images"], s["tokens"], pooled))
    logits2 = np.asarray(run(s["params"], other_images, s["tokens"], pooled))
    if s["cfg"].decoder.fusion == "late":
        np.testing.assert_allclose(logits2, logits, **EXACT)
        logits3 = np.asarray(run(s["params"], s["images"], s["tokens"], pooled + 1.0))
        assert np.all(_differs(logits3[:, 0], logits[:, 0]))  # The pooled vector matters.
    else:
        assert np.all(_differs(logits2[:, 0], logits[:, 0]))


# --- Decoding with the KV cache ------------------------------------------------------------


def test_cached_decoding_matches_the_full_model(setup):
    """Teacher forcing through the cache, five tokens per call (the first call also feeds the
    image prefix, with the prefix-LM mask), gives the full model's logits at every position."""
    s = setup
    model, cfg, params = s["model"], s["cfg"], s["params"]
    full = np.asarray(s["forward"](params, s["images"], s["tokens"]))
    decoder = model.clone(decode=True)
    caption = s["apply"](params, s["images"], s["tokens"])["caption"]
    cache = _initial_cache(decoder, BATCH, caption)
    prefix = caption.shape[1]
    assert prefix == (cfg.vision.caption_queries if cfg.decoder.fusion == "early" else 1)
    key = cache["decoder"]["blocks"]["layers"]["attn"]["cached_key"]
    assert key.shape[3] == prefix + cfg.context_length  # [layers, B, heads, length, head_dim]

    @jax.jit
    def step(cache, tokens, caption):
        logits, updated = decoder.apply(
            {"params": params, "cache": cache},
            tokens,
            caption,
            method=CoCa.decode_step,
            mutable=["cache"],
        )
        return logits, updated["cache"]

    chunk, pieces = 5, []
    for start in range(0, cfg.context_length - 1, chunk):
        logits, cache = step(cache, s["tokens"][:, start : start + chunk], caption)
        caption = None  # The image enters the cache on the first call only.
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-4, atol=1e-4)


@functools.cache
def _greedy(fusion: str) -> np.ndarray:
    s = _setup(fusion)
    fn = make_generate_fn(s["model"], bos_id=BOS, eos_id=-1)  # Never stops: 15 tokens.
    return np.asarray(fn(s["params"], s["images"]))


def test_greedy_generation_matches_naive_loop(setup):
    expected = naive_greedy(setup, eos_id=-1)
    np.testing.assert_array_equal(_greedy(setup["cfg"].decoder.fusion), expected)


@pytest.mark.slow
def test_beam_search_matches_naive_beam(setup):
    """Beam rows reorder the cache every step, the image prefix included."""
    s = setup
    options = GenerateOptions(method="beam", beam_size=3, length_penalty=0.6)
    fn = make_generate_fn(s["model"], bos_id=BOS, eos_id=-1, options=options)
    got = np.asarray(fn(s["params"], s["images"]))
    np.testing.assert_array_equal(got, naive_beam(s, -1, beams=3, alpha=0.6))
    assert not np.array_equal(got, _greedy(s["cfg"].decoder.fusion))  # Not void.


# --- Training and sharding -----------------------------------------------------------------


@pytest.mark.slow
def test_a_few_train_steps_reduce_the_loss(setup):
    """Five plain SGD steps on mmjax.training.objective.loss_and_grads (configs/coca.py's loss: softmax
    contrastive + 2 x caption) on one fixed batch lower the loss and the caption loss."""
    s = setup
    loss_config = load_config(f"configs/coca.py:size=tiny,batch={BATCH}").loss
    model = s["model"]

    @jax.jit
    def step(params, batch):
        loss, aux, grads = loss_and_grads(params, batch, model=model, loss_config=loss_config)
        params = jax.tree.map(lambda p, g: p - 0.3 * g, params, grads)
        return params, loss, aux["caption_loss"]

    tokens = s["tokens"].copy()
    tokens[:, 10:] = PAD
    batch = {"images": s["images"], "tokens": tokens}
    params, history = s["params"], []
    for _ in range(5):
        params, loss, caption = step(params, batch)
        history.append((float(loss), float(caption)))
    losses, captions = zip(*history)
    assert np.all(np.isfinite(history)), history
    # Measured: loss 14.6 -> 8.8, caption loss 6.0 -> 3.5 for both fusions.
    assert losses[-1] < 0.8 * losses[0] and captions[-1] < 0.8 * captions[0], history


_SHARDED = """
import json
import flax.linen as nn
import jax, numpy as np
from flax import serialization
from mmjax.runtime import sharding as shd
from mmjax.models.coca import CoCa
from mmjax.models.config import SIZES, ModelConfig

assert jax.device_count() == 8
folder = FOLDER
rules = shd.DEFAULT_RULES
mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
batch = np.load(f"{folder}/batch.npz")
specs = {}

def spec(x):
    return [list(e) if isinstance(e, tuple) else e for e in x.sharding.spec]

for fusion in ("early", "late"):
    model = CoCa(ModelConfig.sized("tiny", {"decoder.fusion": fusion, **SMALLER}))
    with open(f"{folder}/{fusion}.msgpack", "rb") as f:
        params = serialization.msgpack_restore(f.read())
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch["images"], batch["tokens"])
    params = jax.device_put(params, shd.logical_shardings(boxed["params"], mesh, rules))
    images = jax.device_put(batch["images"], shd.batch_sharding(mesh, rules, 4))
    tokens = jax.device_put(batch["tokens"], shd.batch_sharding(mesh, rules, 2))
    with shd.activate(mesh, rules):
        out = jax.jit(lambda p, i, t: model.apply({"params": p}, i, t))(params, images, tokens)
    kernel = params["decoder"]["blocks"]["layers"]["attn"]["qkv_kernel"]
    specs[fusion] = dict(
        logits=spec(out["logits"]),
        qkv_kernel=spec(kernel),
        image_to_text=spec(params["decoder"]["image_to_text"]["kernel"]),
    )
    np.savez(f"{folder}/{fusion}_out.npz", **{k: np.asarray(out[k]) for k in OUTPUTS})
print(json.dumps(specs))
"""
OUTPUTS = ("logits", "image_emb", "text_emb", "scale")


def _losses(out: dict, tokens: np.ndarray) -> tuple[float, float]:
    caption, _ = caption_loss(jnp.asarray(out["logits"]), jnp.asarray(tokens[:, 1:]), PAD)
    con = contrastive_loss("softmax", out["image_emb"], out["text_emb"], out["scale"])
    return float(caption), float(con)


@pytest.mark.slow
def test_sharded_forward_and_loss_match_one_device(tmp_path):
    """data=2 x fsdp=2 x tensor=2 on 8 forced CPU devices (one subprocess for both fusions,
    with this process's weights, so no init there) gives this process's one-device logits,
    embeddings and losses."""
    rows = 2 * BATCH  # Divisible by data x fsdp; this process runs it as two batches.
    rng = np.random.default_rng(3)
    cfg = _config("early")
    images = rng.integers(0, 256, (rows, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    tokens = rng.integers(3, cfg.vocab_size, (rows, cfg.context_length)).astype(np.int32)
    tokens[:, 0] = BOS
    tokens[::2, 9:] = PAD
    np.savez(tmp_path / "batch.npz", images=images, tokens=tokens)
    for fusion in FUSIONS:
        params = jax.device_get(_setup(fusion)["params"])
        (tmp_path / f"{fusion}.msgpack").write_bytes(serialization.msgpack_serialize(params))
    code = (
        _SHARDED.replace("FOLDER", repr(str(tmp_path)))
        .replace("SMALLER", repr(SMALLER))
        .replace("OUTPUTS", repr(OUTPUTS))
    )
    specs = run_with_devices(code)
    for fusion in FUSIONS:
        # Really split: the batch over data x fsdp, the weights over fsdp and tensor.
        assert specs[fusion] == dict(
            logits=[["data", "fsdp"], None, "tensor"],
            qkv_kernel=[None, "fsdp", None, "tensor", None],
            image_to_text=["fsdp", None],
        ), specs
        s = _setup(fusion)
        pieces = [
            s["apply"](s["params"], images[r : r + BATCH], tokens[r : r + BATCH])
            for r in (0, BATCH)
        ]
        one = {k: np.concatenate([np.asarray(p[k]) for p in pieces]) for k in OUTPUTS[:3]}
        one["scale"] = np.asarray(pieces[0]["scale"])
        eight = dict(np.load(tmp_path / f"{fusion}_out.npz"))
        for key in OUTPUTS:
            np.testing.assert_allclose(eight[key], one[key], rtol=0, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(_losses(eight, tokens), _losses(one, tokens), rtol=1e-6)
        assert np.abs(one["logits"]).max() > 0.1  # Not void.


# --- FLOPs and the ablation config ---------------------------------------------------------


def test_analytic_flops_match_xla():
    """mmjax.models.flops counts each fusion's decoder as it counts CoCa's: against XLA's count of
    the unrolled forward pass (lowered, not compiled; tests/test_flops.py's mid-size model),
    early and late come out within 1% of the cross-attention ratio (measured 0.980 for all
    three; one decoder layer is several percent)."""
    ratios = {}
    for fusion in ("cross_attention", *FUSIONS):
        config = load_config("configs/coca.py:size=tiny", [*MID, f"model.decoder.fusion={fusion}"])
        cfg = ModelConfig.from_mapping(config.model.to_dict()).replace({"scan_layers": False})
        model = CoCa(cfg)
        images = jax.ShapeDtypeStruct((BATCH, cfg.image_size, cfg.image_size, 3), jnp.uint8)
        tokens = jax.ShapeDtypeStruct((BATCH, cfg.context_length), jnp.int32)
        variables = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), images, tokens))
        forward = jax.jit(lambda v, i, t, model=model: model.apply(v, i, t))
        xla = _flops(forward.lower(variables, images, tokens).cost_analysis())
        ratios[fusion] = BATCH * forward_flops_per_example(cfg, causal_discount=False) / xla
    for fusion in FUSIONS:
        assert ratios[fusion] == pytest.approx(ratios["cross_attention"], abs=0.01), ratios


def test_fusion_ablation_sweep():
    spec = "configs/ablations/fusion.py:size=tiny,steps=800"
    sweep = load_sweep(spec)
    assert list(sweep) == ["cross_attention", "early", "late"]
    for variant, deltas in sweep.items():
        config = load_config(spec, variant_overrides(deltas, []))
        cfg = ModelConfig.from_mapping(config.model.to_dict())
        cfg.validate()
        assert cfg.decoder.fusion == variant and config.total_steps == 800
        # Everything else is configs/coca.py's.
        base = load_config(
            "configs/coca.py:size=tiny,steps=800", [f"model.decoder.fusion={variant}"]
        )
        assert config.to_dict() == base.to_dict()

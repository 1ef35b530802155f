"""KV-cached greedy generation against a naive loop that re-runs the full model every step."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.generate import _initial_cache, make_generate_fn
from mmjax.models.coca import CoCa
from mmjax.models.config import SIZES, ModelConfig

PAD, BOS = 0, 1
BATCH = 6


def _unstack(tree):
    """Scanned parameters -> the unrolled layout: blocks/layers[i] -> blocks/layers_i."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "blocks" and set(value) == {"layers"}:
            depth = jax.tree.leaves(value["layers"])[0].shape[0]
            out[key] = {
                f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], value["layers"])
                for i in range(depth)
            }
        else:
            out[key] = _unstack(value)
    return out


@functools.cache
def _scanned_params():
    """One random init (jit-compiled once), shared by every variant below."""
    cfg = ModelConfig.from_mapping(dict(SIZES["tiny"]))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    tokens = np.zeros((BATCH, cfg.context_length), np.int32)
    params = nn.unbox(jax.jit(CoCa(cfg).init)(jax.random.PRNGKey(0), images, tokens)["params"])
    return params, images


def _model(scan_layers: bool, dtype: str = "float32"):
    cfg = ModelConfig.from_mapping(dict(SIZES["tiny"], scan_layers=scan_layers, dtype=dtype))
    params, images = _scanned_params()
    return CoCa(cfg), params if scan_layers else _unstack(params), images


@functools.cache
def _forward(scan_layers: bool):
    model, _, _ = _model(scan_layers)
    return jax.jit(lambda p, i, t: model.apply({"params": p}, i, t)["logits"])


@pytest.fixture(scope="module", params=[True, False], ids=["scan", "unrolled"])
def setup(request):
    model, params, images = _model(request.param)
    return dict(
        model=model, cfg=model.cfg, params=params, images=images, forward=_forward(request.param)
    )


def naive_greedy(s, eos_id: int) -> np.ndarray:
    """Greedy decoding by re-running the whole model on the caption so far, every step."""
    length = s["cfg"].context_length
    tokens = np.full((BATCH, length), PAD, np.int32)
    tokens[:, 0] = BOS
    done = np.zeros(BATCH, bool)
    for t in range(1, length):
        logits = np.array(s["forward"](s["params"], s["images"], tokens)[:, t - 1], np.float32)
        logits[:, [PAD, BOS]] = -np.inf
        nxt = np.where(done, PAD, logits.argmax(-1))
        tokens[:, t] = nxt
        done |= nxt == eos_id
        if done.all():
            break
    return tokens


def _first_eos(row: np.ndarray, eos_id: int) -> int | None:
    hits = np.flatnonzero(row == eos_id)
    return int(hits[0]) if hits.size else None


def _pick_eos(tokens: np.ndarray) -> int:
    """The generated token whose first occurrences are spread most over the rows, so that rows
    stop at different steps (and ideally some never stop)."""

    def spread(v):
        stops = {_first_eos(row, v) for row in tokens[:, 1:]}
        return len(stops), v

    candidates = sorted(set(tokens[:, 2:].ravel().tolist()) - {PAD, BOS})
    return max(candidates, key=spread)


@pytest.fixture(scope="module")
def generated(setup):
    s = setup
    free_run = naive_greedy(s, eos_id=-1)  # Never stops: 15 generated tokens per row.
    eos = _pick_eos(free_run)
    tokens = np.asarray(
        make_generate_fn(s["model"], bos_id=BOS, eos_id=eos)(s["params"], s["images"])
    )
    return dict(eos=eos, tokens=tokens, free_run=free_run)


def test_decode_step_logits_match_full_model(setup):
    """Teacher forcing through the KV cache, five tokens per call, gives the full model's
    logits at every position (the cache mask handles multi-token chunks at any offset)."""
    s = setup
    model, cfg, params = s["model"], s["cfg"], s["params"]
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, cfg.vocab_size, (BATCH, cfg.context_length)).astype(np.int32)
    tokens[:, 0] = BOS
    full = np.asarray(s["forward"](params, s["images"], tokens))

    decoder = model.clone(decode=True)
    chunk = 5
    assert (cfg.context_length - 1) % chunk == 0

    @jax.jit
    def step(cache, tokens, images):
        _, caption_tokens = model.apply({"params": params}, images, method=CoCa.encode_image)
        if cache is None:
            cache = _initial_cache(decoder, BATCH, caption_tokens)
        logits, updated = decoder.apply(
            {"params": params, "cache": cache},
            tokens,
            caption_tokens,
            method=CoCa.decode_step,
            mutable=["cache"],
        )
        return logits, updated["cache"]

    cache = jax.eval_shape(lambda: step(None, tokens[:, :chunk], s["images"])[1])
    cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), cache)
    pieces = []
    for start in range(0, cfg.context_length - 1, chunk):
        logits, cache = step(cache, tokens[:, start : start + chunk], s["images"])
        pieces.append(np.asarray(logits))
    cached = np.concatenate(pieces, axis=1)
    assert cached.shape == full.shape
    np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)


def test_greedy_generation_matches_naive_loop(setup, generated):
    s, eos = setup, generated["eos"]
    expected = naive_greedy(s, eos_id=eos)
    got = generated["tokens"]
    for row in range(BATCH):
        stop = _first_eos(expected[row], eos)
        end = s["cfg"].context_length if stop is None else stop + 1
        np.testing.assert_array_equal(got[row, :end], expected[row, :end], err_msg=f"row {row}")
    np.testing.assert_array_equal(got, expected)


def test_generation_stops_at_eos_and_pads_after(setup, generated):
    s, eos, tokens = setup, generated["eos"], generated["tokens"]
    length = s["cfg"].context_length
    assert tokens.shape == (BATCH, length)
    assert tokens.dtype == np.int32
    assert np.all(tokens[:, 0] == BOS)
    stops = [_first_eos(row, eos) for row in tokens]
    # The chosen EOS makes rows stop at different steps; the test is void otherwise.
    assert len(set(stops)) >= 2 and any(stop is not None for stop in stops), stops
    for row, stop in zip(tokens, stops):
        end = length if stop is None else stop + 1
        assert not np.isin(row[1:end], [PAD, BOS]).any(), row
        assert np.all(row[end:] == PAD), row
    # Before its EOS each row is exactly the free-running (never-stopping) generation.
    for row, free, stop in zip(tokens, generated["free_run"], stops):
        end = length if stop is None else stop + 1
        np.testing.assert_array_equal(row[:end], free[:end])


def test_scanned_and_unrolled_models_agree():
    """Same weights in both layouts give the same logits (checks `_unstack` and the scan)."""
    _, scanned, images = _model(True)
    _, unrolled, _ = _model(False)
    tokens = np.random.default_rng(2).integers(3, 256, (BATCH, 16)).astype(np.int32)
    np.testing.assert_allclose(
        np.asarray(_forward(True)(scanned, images, tokens)),
        np.asarray(_forward(False)(unrolled, images, tokens)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_bfloat16_generation_returns_int_tokens():
    """bf16 compute (f32 weights) through the whole decode loop: an EOS id that is rarely
    produced keeps most rows generating to the last position."""
    model, params, images = _model(scan_layers=True, dtype="bfloat16")
    eos = model.cfg.vocab_size - 1
    tokens = make_generate_fn(model, bos_id=BOS, eos_id=eos)(params, jnp.asarray(images))
    assert tokens.shape == (BATCH, model.cfg.context_length)
    assert jnp.issubdtype(tokens.dtype, jnp.integer)
    tokens = np.asarray(tokens)
    assert np.all(tokens[:, 0] == BOS)
    assert np.all((tokens >= 0) & (tokens < model.cfg.vocab_size))
    for row in tokens:
        stop = _first_eos(row, eos)
        end = len(row) if stop is None else stop + 1
        assert not np.isin(row[1:end], [PAD, BOS]).any(), row
        assert np.all(row[end:] == PAD), row

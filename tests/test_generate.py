"""KV-cached generation (greedy, beam search, sampling) against naive loops that re-run the
full model every step, and the logit constraints on hand-made logits."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.inference.generate import (
    GenerateOptions,
    _initial_cache,
    constrain_logits,
    filter_logits,
    make_generate_fn,
    unrolled,
)
from mmjax.models.coca import CoCa
from mmjax.models.config import SIZES, ModelConfig
from mmjax.models.layers import unstack_layers

PAD, BOS = 0, 1
BATCH = 6


@functools.cache
def _scanned_params():
    """One random init (jit-compiled once), shared by every variant below."""
    cfg = ModelConfig.sized("tiny")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    tokens = np.zeros((BATCH, cfg.context_length), np.int32)
    params = nn.unbox(jax.jit(CoCa(cfg).init)(jax.random.PRNGKey(0), images, tokens)["params"])
    return params, images


def _model(scan_layers: bool, dtype: str = "float32"):
    cfg = ModelConfig.sized("tiny", {"scan_layers": scan_layers, "dtype": dtype})
    params, images = _scanned_params()
    return CoCa(cfg), params if scan_layers else unstack_layers(params), images


@functools.cache
def _forward(scan_layers: bool):
    model, _, _ = _model(scan_layers)
    return jax.jit(lambda p, i, t: model.apply({"params": p}, i, t)["logits"])


@functools.cache
def _setup(scan_layers: bool) -> dict:
    model, params, images = _model(scan_layers)
    return dict(
        model=model, cfg=model.cfg, params=params, images=images, forward=_forward(scan_layers)
    )


@pytest.fixture(scope="module", params=[True, False], ids=["scan", "unrolled"])
def setup(request):
    return _setup(request.param)


def test_unrolled_layout_is_the_same_model():
    """`unrolled` (the inference layout) gives the unrolled model's exact parameter tree and the
    scanned model's outputs; an unrolled model comes back as it is."""
    scanned = _setup(True)
    model, params = unrolled(scanned["model"], scanned["params"])
    assert not model.cfg.scan_layers and model.cfg == _setup(False)["cfg"]
    cfg, images = model.cfg, scanned["images"]
    tokens = np.zeros((BATCH, cfg.context_length), np.int32)
    expected = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), images, tokens)))
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), expected["params"])
    tokens = np.random.default_rng(1).integers(3, cfg.vocab_size, tokens.shape).astype(np.int32)
    np.testing.assert_allclose(
        _forward(False)(params, images, tokens),
        scanned["forward"](scanned["params"], images, tokens),
        rtol=1e-5,
        atol=1e-5,
    )
    again = unrolled(model, params)
    assert again[0] is model and again[1] is params


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


@functools.cache
def _generated(scan_layers: bool) -> dict:
    s = _setup(scan_layers)
    free_run = naive_greedy(s, eos_id=-1)  # Never stops: 15 generated tokens per row.
    eos = _pick_eos(free_run)
    tokens = np.asarray(
        make_generate_fn(s["model"], bos_id=BOS, eos_id=eos)(s["params"], s["images"])
    )
    return dict(eos=eos, tokens=tokens, free_run=free_run)


@pytest.fixture(scope="module")
def generated(setup):
    return _generated(setup["cfg"].scan_layers)


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


# --- Beam search, sampling and the logit constraints ------------------------------------------


@functools.cache
def _generate_fn(scan_layers: bool, eos: int, options: GenerateOptions):
    """One compile per (layout, EOS, options), shared by the tests below."""
    model, _, _ = _model(scan_layers)
    return make_generate_fn(model, bos_id=BOS, eos_id=eos, options=options)


def _run(scan_layers: bool, eos: int, rng=None, **options) -> np.ndarray:
    _, params, images = _model(scan_layers)
    fn = _generate_fn(scan_layers, eos, GenerateOptions(**options))
    return np.asarray(fn(params, images, rng))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _full_logits(s, tokens: np.ndarray) -> np.ndarray:
    """Full-model next-token logits [rows, L, V]; rows are (image, copy) image-major."""
    images = np.repeat(s["images"], len(tokens) // BATCH, axis=0)
    return np.array(s["forward"](s["params"], images, tokens), np.float32)


def _full_logp(s, tokens: np.ndarray) -> np.ndarray:
    """Full-model next-token log-probabilities [rows, L, V], PAD and BOS banned."""
    logits = _full_logits(s, tokens)
    logits[..., [PAD, BOS]] = -np.inf
    return _log_softmax(logits)


def _gnmt(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


def naive_beam(s, eos_id: int, beams: int, alpha: float, penalty: float = 1.0) -> np.ndarray:
    """Beam search re-running the full model on every alive prefix, to the last position
    (no early stopping), one image at a time in Python; `penalty`: repetition penalty."""
    length = s["cfg"].context_length
    vocab = s["cfg"].vocab_size
    alive = np.full((BATCH, beams, length), PAD, np.int32)
    alive[..., 0] = BOS
    alive_logp = np.full((BATCH, beams), -np.inf, np.float32)
    alive_logp[:, 0] = 0.0  # The other copies of the BOS beam are not expanded.
    best = alive[:, 0].copy()
    best_score = np.full(BATCH, -np.inf)
    for t in range(1, length):
        logits = _full_logits(s, alive.reshape(BATCH * beams, length))[:, t - 1]
        logits = logits.reshape(BATCH, beams, vocab)
        for b, k in np.ndindex(BATCH, beams):
            seen = list(set(alive[b, k, 1:t].tolist()))
            logits[b, k, seen] = np.where(
                logits[b, k, seen] > 0, logits[b, k, seen] / penalty, logits[b, k, seen] * penalty
            )
        logits[..., [PAD, BOS]] = -np.inf
        logp = _log_softmax(logits)
        for b in range(BATCH):
            flat = (alive_logp[b, :, None] + logp[b]).ravel()
            survivors = []
            for rank, i in enumerate(np.argsort(-flat, kind="stable")[: 2 * beams]):
                parent, token = divmod(int(i), vocab)
                if token == eos_id:
                    score = flat[i] / _gnmt(t, alpha)
                    if rank < beams and score > best_score[b]:
                        best_score[b] = score
                        best[b] = alive[b, parent]
                        best[b, t] = eos_id
                elif len(survivors) < beams:
                    survivors.append((flat[i], parent, token))
            rows = alive[b, [p for _, p, _ in survivors]]
            rows[:, t] = [tok for _, _, tok in survivors]
            alive[b] = rows
            alive_logp[b] = [lp for lp, _, _ in survivors]
    return np.where(np.isfinite(best_score)[:, None], best, alive[:, 0])


def _scores(s, tokens: np.ndarray, eos_id: int, alpha: float) -> np.ndarray:
    """Length-penalised log-probability of each row's caption under the full model."""
    logp = _full_logp(s, tokens)
    out = []
    for row, lp in zip(tokens, logp):
        stop = _first_eos(row, eos_id)
        end = len(row) if stop is None else stop + 1
        total = sum(lp[t - 1, row[t]] for t in range(1, end))
        out.append(total / _gnmt(end - 1, alpha))
    return np.array(out)


def _check_layout(tokens: np.ndarray, eos_id: int, max_length: int = 15):
    """BOS, generated tokens (no PAD or BOS) up to EOS or max_length, then only PAD."""
    assert tokens.shape == (BATCH, 16) and np.all(tokens[:, 0] == BOS)
    for row in tokens:
        stop = _first_eos(row, eos_id)
        end = max_length + 1 if stop is None else stop + 1
        assert not np.isin(row[1:end], [PAD, BOS]).any(), row
        assert np.all(row[end:] == PAD), row


@pytest.mark.parametrize(
    "scan, alpha, penalty, stops",
    [(True, 0.0, 1.0, True), (True, 2.0, 1.0, True), (False, 0.6, 1.5, False)],
    ids=["scan-no_length_penalty", "scan-strong_length_penalty", "unrolled-repetition_penalty"],
)
def test_beam_search_matches_naive_beam(scan, alpha, penalty, stops):
    """KV-cached beam search (cache rows reordered by parent every step, early stopping) gives
    token for token what a full re-run on every prefix gives.

    A strong length penalty (2) is where stopping early on a wrong bound would miss a later,
    longer hypothesis. One unrolled variant (its cache has no layer axis), never stopping
    (EOS -1) so that beams grow apart and their repetition-penalty histories must follow them.
    """
    s, generated = _setup(scan), _generated(scan)
    eos = generated["eos"] if stops else -1
    options = dict(method="beam", beam_size=3, length_penalty=alpha, repetition_penalty=penalty)
    got = _run(scan, eos, **options)
    expected = naive_beam(s, eos, beams=3, alpha=alpha, penalty=penalty)
    np.testing.assert_array_equal(got, expected)
    _check_layout(got, eos)
    # Not void: beam search found something other than greedy in some row.
    assert not np.array_equal(got, generated["tokens" if stops else "free_run"])


def test_beam_scores_at_least_greedy():
    """Where greedy finished, beam search's caption scores at least as high under the same
    length-penalised scoring (an unfinished greedy caption is not a comparable hypothesis)."""
    s, generated = _setup(True), _generated(True)  # Layout-independent: scanned only.
    eos, greedy = generated["eos"], generated["tokens"]
    for alpha in (0.0, 2.0):  # The compiles of test_beam_search_matches_naive_beam.
        beam = _run(True, eos, method="beam", beam_size=3, length_penalty=alpha)
        finished = np.array([_first_eos(row, eos) is not None for row in greedy])
        assert finished.sum() >= 2, greedy
        beam_scores = _scores(s, beam, eos, alpha)[finished]
        greedy_scores = _scores(s, greedy, eos, alpha)[finished]
        assert np.all(beam_scores >= greedy_scores - 1e-5), (alpha, beam_scores, greedy_scores)
        assert np.any(beam_scores > greedy_scores + 1e-3), (alpha, beam_scores, greedy_scores)


def test_beam_size_one_is_greedy():
    """Without length penalty: an EOS completes a hypothesis only when it is the argmax."""
    generated = _generated(True)  # Layout-independent: scanned only.
    eos = generated["eos"]
    beam = _run(True, eos, method="beam", beam_size=1, length_penalty=0.0)
    np.testing.assert_array_equal(beam, generated["tokens"])


def test_sampling_filters_reduce_to_greedy():
    """top_k=1 (at any temperature) and a tiny top_p leave only the argmax token."""
    generated = _generated(True)  # Layout-independent: scanned only.
    eos, greedy = generated["eos"], generated["tokens"]
    for options in (dict(top_k=1, temperature=2.0), dict(top_p=1e-6)):
        for seed in (0, 1):
            got = _run(True, eos, jax.random.PRNGKey(seed), method="sample", **options)
            np.testing.assert_array_equal(got, greedy, err_msg=str(options))


def test_sampling_is_reproducible_and_rng_dependent():
    eos = 255
    hot = dict(method="sample", temperature=2.0)
    first = _run(True, eos, jax.random.PRNGKey(0), **hot)
    np.testing.assert_array_equal(first, _run(True, eos, jax.random.PRNGKey(0), **hot))
    other = _run(True, eos, jax.random.PRNGKey(1), **hot)
    assert (first != other).mean() > 0.5, (first, other)
    _check_layout(first, eos)
    _check_layout(other, eos)
    with pytest.raises(ValueError, match="rng"):
        _run(True, eos, None, **hot)


def test_min_and_max_length():
    """min_length holds EOS back; max_length cuts rows, leaving only padding after."""
    generated = _generated(True)  # Layout-independent: scanned only.
    # An EOS that unconstrained greedy (the free run up to its first EOS) emits as the first or
    # second token in some row, so min_length must hold it back, and that later steps still
    # favour, so a broken min_length that bans EOS for good would show.
    free = generated["free_run"]
    eos = max(set(free[:, 1:3].ravel().tolist()), key=lambda v: (free[:, 4:] == v).any(1).sum())
    assert min(_first_eos(row, eos) or 99 for row in free) <= 2
    stops = []
    for method in ("greedy", "beam"):
        # Three tokens, then EOS or a fourth token and the end.
        got = _run(True, eos, method=method, min_length=3, max_length=4, beam_size=2)
        _check_layout(got, eos, max_length=4)
        assert np.all(got[:, 5:] == PAD), got
        stops += [_first_eos(row, eos) for row in got]
    assert set(stops) == {None, 4}, stops  # Both ways of ending occur.
    with pytest.raises(ValueError, match="max_length=16"):
        _run(True, eos, max_length=16)


def test_repetition_penalty_changes_greedy_output():
    """A strong penalty makes greedy stop repeating itself (the per-token arithmetic is
    checked exactly in test_constrain_logits_on_hand_made_logits)."""
    generated = _generated(True)  # Layout-independent: scanned only.
    plain = generated["free_run"]  # Never-stopping greedy: the random model repeats a lot.
    penalised = _run(True, -1, repetition_penalty=20.0)

    def repeats(tokens):
        return sum(len(row) - 1 - len(set(row[1:].tolist())) for row in tokens)

    assert repeats(penalised) < repeats(plain) // 2, (penalised, plain)


def test_constrain_logits_on_hand_made_logits():
    logits = jnp.array([[2.0, -1.0, 4.0, -3.0, 1.0, 0.5]])
    seen = jnp.array([[False, True, True, False, False, True]])
    options = GenerateOptions(repetition_penalty=2.0, min_length=2)
    out = constrain_logits(
        logits, generated=1, seen=seen, eos_id=4, banned_ids=(0,), options=options
    )
    # Seen tokens: positive logits halved, negative doubled; PAD (0) banned; EOS (4) too early.
    np.testing.assert_array_equal(out, [[-np.inf, -2.0, 2.0, -3.0, -np.inf, 0.25]])
    out = constrain_logits(
        logits, generated=2, seen=seen, eos_id=4, banned_ids=(0, 3), options=options
    )
    np.testing.assert_array_equal(out, [[-np.inf, -2.0, 2.0, -np.inf, 1.0, 0.25]])
    out = constrain_logits(
        logits, generated=0, seen=seen, eos_id=4, banned_ids=(0,), options=GenerateOptions()
    )
    np.testing.assert_array_equal(out, [[-np.inf, -1.0, 4.0, -3.0, 1.0, 0.5]])


def test_filter_logits_masks():
    probs = np.array([0.05, 0.5, 0.15, 0.3], np.float32)
    logits = jnp.log(jnp.asarray(probs))[None]
    kept = lambda out: np.isfinite(np.asarray(out))[0].tolist()
    assert kept(filter_logits(logits, top_k=2)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_k=4)) == [True] * 4
    # Mass of strictly more likely tokens: 0.5 -> 0, 0.3 -> 0.5, 0.15 -> 0.8, 0.05 -> 0.95.
    assert kept(filter_logits(logits, top_p=0.85)) == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=0.6)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.4)) == [False, True, False, False]
    # Top-p renormalises over what top-k kept: {0.5, 0.3, 0.15} / 0.95 leave 0.842 before
    # 0.15 (0.8 without renormalising), {0.5, 0.3} / 0.8 leave 0.625 before 0.3 (0.5).
    assert kept(filter_logits(logits, top_k=3, top_p=0.82)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_k=2, top_p=0.6)) == [False, True, False, False]
    np.testing.assert_allclose(filter_logits(logits, temperature=2.0), logits / 2.0)


@pytest.mark.parametrize(
    "mapping, message",
    [
        (dict(beam=4), "generate option beam=4 is unknown"),
        (dict(method="nucleus"), "generate option method='nucleus' is unknown"),
        (dict(beam_size=0), "beam_size=0 must be"),
        (dict(beam_size=2.0), "beam_size=2.0 must be"),
        (dict(top_k=True), "top_k=True must be"),
        (dict(top_p=0.0), "top_p=0.0 must be"),
        (dict(top_p=1.5), "top_p=1.5 must be"),
        (dict(temperature=0), "temperature=0 must be > 0"),
        (dict(temperature="hot"), "temperature='hot' must be a finite number"),
        (dict(length_penalty=-0.5), "length_penalty=-0.5 must be >= 0"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty=nan must be"),
        (dict(min_length=-1), "min_length=-1 must be"),
    ],
)
def test_generate_options_errors(mapping, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        GenerateOptions.from_mapping(mapping)
    assert "\n" not in str(info.value)


def test_generate_options_from_mapping():
    options = GenerateOptions.from_mapping(dict(method="sample", top_k=5, top_p=0.9))
    assert options == GenerateOptions(method="sample", top_k=5, top_p=0.9)
    assert GenerateOptions.from_mapping({}) == GenerateOptions()

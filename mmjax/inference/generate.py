"""Caption generation with a KV cache, in one jitted decode loop.

The image is encoded once; its caption tokens are projected to keys/values
once per decoder layer (on the first decode call) and reused; every later
step runs the text towers on the new token(s) against cached keys/values
of all earlier positions, so a caption of L tokens costs O(L) token-steps
instead of open_clip's O(L^2) re-runs of both towers.

Methods (`GenerateOptions.method`): greedy, beam search (GNMT length
penalty) and sampling (temperature, top-k, top-p). min_length, max_length
and the repetition penalty apply to all three. Every method returns tokens
[B, context_length]: BOS, generated tokens, EOS, then padding. Rows stay
first in every array the loop creates (beam search flattens (image, beam)
into rows image-major), so the logical 'batch' sharding still applies.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mmjax.models.coca import CoCa
from mmjax.models.layers import unstack_layers

METHODS = ("greedy", "beam", "sample")


def _option_problem(name: str, value: Any) -> str | None:
    """What is wrong with one option value, or None."""
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if name == "method":
        return None if value in METHODS else f"is unknown; allowed: {', '.join(METHODS)}"
    if name == "beam_size":
        return None if is_int and value >= 1 else "must be an integer >= 1"
    if name in ("top_k", "min_length", "max_length"):
        return None if is_int and value >= 0 else "must be an integer >= 0"
    if not (is_real and math.isfinite(value)):
        return "must be a finite number"
    if name == "length_penalty" and value < 0:
        # A negative alpha rewards short captions and voids the early-stopping bound.
        return "must be >= 0 (0 = no length penalty)"
    if name in ("temperature", "repetition_penalty") and value <= 0:
        return "must be > 0"
    if name == "top_p" and not 0 < value <= 1:
        return "must be in (0, 1] (1 = off)"
    return None


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """How captions are decoded; hashable, so it can be a static jit argument."""

    method: str = "greedy"  # greedy | beam | sample
    beam_size: int = 4
    # Beam: score = logprob / ((5 + len) / 6) ** alpha (GNMT); 0 = none.
    length_penalty: float = 0.6
    temperature: float = 1.0  # Sample.
    top_k: int = 0  # Sample: 0 = off.
    top_p: float = 1.0  # Sample: nucleus, 1.0 = off.
    # EOS is forbidden until this many (non-EOS) tokens have been generated.
    min_length: int = 0
    # Generated tokens incl. EOS; 0 = context_length - 1.
    max_length: int = 0
    # CTRL-style: logits of already generated tokens / p if > 0 else * p.
    repetition_penalty: float = 1.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            problem = _option_problem(field.name, value)
            if problem:
                raise ValueError(f"generate option {field.name}={value!r} {problem}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> GenerateOptions:
        """Raises ValueError naming the first unknown key or bad value, in one line."""
        names = [field.name for field in dataclasses.fields(cls)]
        for key, value in mapping.items():
            if key not in names:
                raise ValueError(
                    f"generate option {key}={value!r} is unknown; allowed: {', '.join(names)}"
                )
        return cls(**mapping)


def constrain_logits(
    logits: jax.Array,
    *,
    generated: jax.Array | int,
    seen: jax.Array | None,
    eos_id: int,
    banned_ids: tuple[int, ...],
    options: GenerateOptions,
) -> jax.Array:
    """The constraints of every method, on logits [..., V] -> float32 logits.

    `generated`: tokens generated before this position (min_length);
    `seen` [..., V]: which tokens were generated already (repetition penalty).
    """
    logits = logits.astype(jnp.float32)
    penalty = options.repetition_penalty
    if penalty != 1.0:
        penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
        logits = jnp.where(seen, penalised, logits)
    banned = jnp.zeros(logits.shape[-1], bool).at[jnp.asarray(banned_ids)].set(True)
    logits = jnp.where(banned, -jnp.inf, logits)
    if options.min_length > 0:
        too_early = jnp.asarray(generated) < options.min_length
        logits = logits.at[..., eos_id].set(jnp.where(too_early, -jnp.inf, logits[..., eos_id]))
    return logits


def filter_logits(
    logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """Sampling filters, in this order: temperature, top-k, then top-p over what top-k kept.

    Filtered-out tokens get -inf. Top-p keeps the most likely tokens while the probability
    of the strictly more likely ones is below p, so the most likely token always stays.
    """
    logits = logits.astype(jnp.float32) / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ranked = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        threshold = jnp.min(jnp.where(before < top_p, ranked, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def first_argmax(logits: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first index of the maximum) -> int32.

    Two plain reductions: XLA:CPU's fused (value, index) argmax reduce is ~5x slower, which is
    ~1 ms of a ~15 ms decode step at vocabulary 32k.
    """
    vocab = logits.shape[-1]
    best = jnp.max(logits, axis=-1, keepdims=True)
    index = jnp.where(logits == best, jnp.arange(vocab, dtype=jnp.int32), vocab)
    # NaN logits equal nothing: clip so that the token stays inside the vocabulary.
    return jnp.minimum(jnp.min(index, axis=-1), vocab - 1)


def length_penalty(length: jax.Array | int, alpha: float) -> jax.Array:
    """GNMT: ((5 + length) / 6) ** alpha; a hypothesis scores logprob / this."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _initial_cache(decoder: CoCa, batch: int, caption_tokens: jax.Array, length: int | None = None):
    """Zeroed cache variables sized for `length` positions (default: context_length)."""
    length = length or decoder.cfg.context_length
    shapes = jax.eval_shape(
        lambda: decoder.init(
            jax.random.PRNGKey(0),
            jnp.zeros((batch, length), jnp.int32),
            caption_tokens,
            method=CoCa.decode_step,
        )
    )["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _cache_batch_axes(decoder: CoCa, caption_tokens: jax.Array):
    """Per cache leaf: the axis that grows with the batch, or -1 (counters).

    Found by comparing the cache shapes at two batch sizes rather than assumed, since scanned
    layers put a leading layer axis in front of the batch. Both sizes are multiples of the
    real batch so that sharding constraints stay divisible under a mesh.
    """
    batch = caption_tokens.shape[0]

    def shapes(rows):
        context = jax.ShapeDtypeStruct((rows,) + caption_tokens.shape[1:], caption_tokens.dtype)
        return jax.eval_shape(lambda c: _initial_cache(decoder, rows, c), context)

    def axis(one, two):
        grown = [i for i, (a, b) in enumerate(zip(one.shape, two.shape)) if a != b]
        return grown[0] if grown else -1

    return jax.tree.map(axis, shapes(batch), shapes(2 * batch))


def _take_beams(x: jax.Array, parent: jax.Array, axis: int = 0) -> jax.Array:
    """x's axes `axis`, `axis` + 1 are (image, beam); beam k of image b becomes parent[b, k]."""
    index = parent.reshape((1,) * axis + parent.shape + (1,) * (x.ndim - axis - 2))
    return jnp.take_along_axis(x, index, axis=axis + 1)


def _gather_beams(x: jax.Array, parent: jax.Array, axis: int) -> jax.Array:
    """Like `_take_beams` for x whose `axis` holds the rows (image, beam) image-major.

    Gathering within each image (not across the flat row axis) keeps it a per-image
    operation, which a batch-sharded layout can do without moving rows between devices.
    """
    shape = x.shape
    x = x.reshape(shape[:axis] + parent.shape + shape[axis + 1 :])
    return _take_beams(x, parent, axis).reshape(shape)


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What every decode loop needs: the decode-mode model and the static settings."""

    model: CoCa
    params: Any
    bos_id: int
    eos_id: int
    pad_id: int
    options: GenerateOptions
    max_length: int

    @property
    def decoder(self) -> CoCa:
        return self.model.clone(decode=True)

    def step(self, tokens, cache, context):
        """-> (logits [rows, V] of the last new position, updated cache)."""
        logits, updated = self.decoder.apply(
            {"params": self.params, "cache": cache},
            tokens,
            context,
            method=CoCa.decode_step,
            mutable=["cache"],
        )
        return logits[:, -1], updated["cache"]

    def constrain(self, logits, generated, seen):
        # PAD and BOS are never generated: a PAD inside a caption would be masked
        # as padding by the text encoder.
        return constrain_logits(
            logits,
            generated=generated,
            seen=seen,
            eos_id=self.eos_id,
            banned_ids=(self.pad_id, self.bos_id),
            options=self.options,
        )

    def start(self, rows: int, caption_tokens):
        """The BOS step (which also caches the image keys/values) -> (logits, cache)."""
        # Positions fed: BOS and all generated tokens but the last. A cache no longer than
        # that keeps the per-step attention and cache traffic to what this call can use.
        cache = _initial_cache(self.decoder, rows, caption_tokens, self.max_length)
        bos = jnp.full((rows, 1), self.bos_id, jnp.int32)
        return self.step(bos, cache, caption_tokens)

    def empty_tokens(self, shape):
        length = self.model.cfg.context_length
        return jnp.full(shape + (length,), self.pad_id, jnp.int32).at[..., 0].set(self.bos_id)

    def seen_init(self, shape):
        # Only tracked when the repetition penalty reads it: [rows, V] bools cost memory.
        if self.options.repetition_penalty == 1.0:
            return None
        return jnp.zeros(shape + (self.model.cfg.vocab_size,), bool)


def _mark_seen(seen, token):
    if seen is None:
        return None
    return seen | jax.nn.one_hot(token, seen.shape[-1], dtype=bool)


def _greedy_or_sample(s: _Setup, caption_tokens, rng) -> jax.Array:
    batch = caption_tokens.shape[0]
    options = s.options

    def pick(t, logits, tokens, seen, done):
        logits = s.constrain(logits, t - 1, seen)
        if options.method == "sample":
            logits = filter_logits(
                logits, temperature=options.temperature, top_k=options.top_k, top_p=options.top_p
            )
            token = jax.random.categorical(jax.random.fold_in(rng, t), logits, axis=-1)
        else:
            token = first_argmax(logits)
        token = jnp.where(done, s.pad_id, token).astype(jnp.int32)
        tokens = tokens.at[:, t].set(token)
        return tokens, _mark_seen(seen, token), done | (token == s.eos_id), token

    logits, cache = s.start(batch, caption_tokens)
    first = pick(1, logits, s.empty_tokens((batch,)), s.seen_init((batch,)), jnp.zeros(batch, bool))

    def cond(carry):
        t, _, (_, _, done, _) = carry
        return (t <= s.max_length) & ~jnp.all(done)

    def body(carry):
        # Feeding the previous token and picking the next in one body: exactly one decode
        # step per generated token, none wasted after the last.
        t, cache, (tokens, seen, done, token) = carry
        logits, cache = s.step(token[:, None], cache, None)
        return t + 1, cache, pick(t, logits, tokens, seen, done)

    _, _, (tokens, _, _, _) = jax.lax.while_loop(cond, body, (jnp.int32(2), cache, first))
    return tokens


def _beam_search(s: _Setup, caption_tokens) -> jax.Array:
    """Beam search with separate alive and finished hypotheses.

    Each step ranks the 2K best extensions of the K alive beams by log-probability. An EOS
    among the K best completes a hypothesis scored logprob / length_penalty(generated incl.
    EOS) (only the best per image is kept, that is all that is returned); the K best non-EOS
    extensions stay alive. An image is done once no alive beam can beat its best finished
    score: scores only fall as a beam grows and alpha >= 0, so the bound is
    best alive logprob / length_penalty(max_length). Early stopping thus never changes the
    result. Images without a finished hypothesis return their best alive beam.
    """
    batch, beams = caption_tokens.shape[0], s.options.beam_size
    vocab, alpha = s.model.cfg.vocab_size, s.options.length_penalty
    axes = _cache_batch_axes(s.decoder, caption_tokens)
    # Cross-attention keys/values are the same for every beam of an image: never reordered.
    reorder = jax.tree_util.tree_map_with_path(
        lambda path, axis: -1 if "context_" in jax.tree_util.keystr(path) else axis, axes
    )

    logits, cache = s.start(batch, caption_tokens)
    # Every beam starts from the image's BOS state, which is computed once and copied.
    cache = jax.tree.map(lambda x, a: x if a < 0 else jnp.repeat(x, beams, axis=a), cache, axes)
    logits = jnp.repeat(logits, beams, axis=0)

    def select(t, logits, state):
        alive, alive_logp, seen, best, best_score = state
        logits = s.constrain(logits.reshape(batch, beams, vocab), t - 1, seen)
        logp = alive_logp[..., None] + jax.nn.log_softmax(logits, axis=-1)
        top, index = jax.lax.top_k(logp.reshape(batch, beams * vocab), 2 * beams)
        parent, token = index // vocab, index % vocab
        is_eos = token == s.eos_id
        # As in HF, only an EOS ranked among the K best completes a hypothesis, which makes
        # beam 1 without length penalty exactly greedy.
        ranked_high = jnp.arange(2 * beams) < beams
        score = jnp.where(is_eos & ranked_high, top / length_penalty(t, alpha), -jnp.inf)
        pick = jnp.argmax(score, axis=1)
        new_score = jnp.take_along_axis(score, pick[:, None], axis=1)[:, 0]
        new_parent = jnp.take_along_axis(parent, pick[:, None], axis=1)
        finished = _take_beams(alive, new_parent)[:, 0]
        finished = finished.at[:, t].set(s.eos_id)
        better = new_score > best_score  # Strict: a later tie never replaces.
        best = jnp.where(better[:, None], finished, best)
        best_score = jnp.where(better, new_score, best_score)
        # Each beam offers EOS once, so at least K of the 2K candidates are not EOS.
        alive_logp, keep = jax.lax.top_k(jnp.where(is_eos, -jnp.inf, top), beams)
        parent = jnp.take_along_axis(parent, keep, axis=1)
        token = jnp.take_along_axis(token, keep, axis=1).astype(jnp.int32)
        alive = _take_beams(alive, parent).at[:, :, t].set(token)
        if seen is not None:
            seen = _mark_seen(_take_beams(seen, parent), token)
        return (alive, alive_logp, seen, best, best_score), parent, token

    def reorder_cache(cache, parent):
        return jax.tree.map(
            lambda x, a: x if a < 0 else _gather_beams(x, parent, a), cache, reorder
        )

    # Only beam 0 is live at first: the K copies are identical and must not be expanded K times.
    alive_logp = jnp.full((batch, beams), -jnp.inf).at[:, 0].set(0.0)
    state = (
        s.empty_tokens((batch, beams)),
        alive_logp,
        s.seen_init((batch, beams)),
        s.empty_tokens((batch,)),
        jnp.full((batch,), -jnp.inf),
    )
    state, parent, token = select(1, logits, state)
    cache = reorder_cache(cache, parent)

    def cond(carry):
        t, _, _, state = carry
        _, alive_logp, _, _, best_score = state
        reachable = alive_logp[:, 0] / length_penalty(s.max_length, alpha)
        return (t <= s.max_length) & ~jnp.all(best_score >= reachable)

    def body(carry):
        t, cache, token, state = carry
        logits, cache = s.step(token.reshape(batch * beams, 1), cache, None)
        state, parent, token = select(t, logits, state)
        return t + 1, reorder_cache(cache, parent), token, state

    _, _, _, state = jax.lax.while_loop(cond, body, (jnp.int32(2), cache, token, state))
    alive, _, _, best, best_score = state
    return jnp.where((best_score > -jnp.inf)[:, None], best, alive[:, 0])


def generate(
    model: CoCa,
    params,
    images: jax.Array,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int = 0,
    options: GenerateOptions = GenerateOptions(),
    rng: jax.Array | None = None,
) -> jax.Array:
    """-> tokens [B, context_length]: BOS, generated tokens, EOS, then padding.

    Call under jit (see `make_generate_fn`). `rng` is required for method 'sample'.
    """
    length = model.cfg.context_length
    max_length = options.max_length or length - 1
    if max_length > length - 1:
        raise ValueError(
            f"generate option max_length={options.max_length} exceeds context_length - 1 = "
            f"{length - 1} (the BOS takes one position)"
        )
    if options.method == "sample" and rng is None:
        raise ValueError("generate method 'sample' needs an rng (a jax.random key)")
    _, caption_tokens = model.apply({"params": params}, images, method=CoCa.encode_image)
    # Decode unrolled: for a scanned model that is one copy of the weights per call here, not
    # one per token in every layer. Callers that generate repeatedly pass `unrolled` ones.
    model, params = unrolled(model, params)
    setup = _Setup(model, params, bos_id, eos_id, pad_id, options, max_length)
    if options.method == "beam":
        return _beam_search(setup, caption_tokens)
    return _greedy_or_sample(setup, caption_tokens, rng)


def generated_positions(options: GenerateOptions, context_length: int) -> int:
    """How many leading positions of `generate`'s rows can hold text: BOS and max_length
    tokens. The rest is padding, which a tokenizer must never decode (CLIP BPE's id 0, the
    pad id, is also the token "!")."""
    return 1 + (options.max_length or context_length - 1)


def unrolled(model: CoCa, params) -> tuple[CoCa, Any]:
    """(model, params) in the unrolled-layer layout (model.scan_layers=False), for inference.

    A scanned layer slices (copies) its weights out of the stack at every call, and a cached
    decode step, which reads every weight for only a few rows, paid that copy at every token
    (a quarter of the step on CPU). Unstacked once, the weights are read in place. Sharded
    parameters keep their layout; an unrolled model comes back unchanged.
    """
    if not model.cfg.scan_layers:
        return model, params
    cfg = dataclasses.replace(model.cfg, scan_layers=False)
    return model.clone(cfg=cfg), _unstack_layers(params)


_unstack_layers = jax.jit(unstack_layers)  # One program, not an op per leaf (outside jit).


def greedy_generate(
    model: CoCa, params, images: jax.Array, *, bos_id: int, eos_id: int, pad_id: int = 0
) -> jax.Array:
    """Greedy `generate`; stops early once every row has produced EOS."""
    return generate(model, params, images, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)


def make_generate_fn(
    model: CoCa,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int = 0,
    options: GenerateOptions = GenerateOptions(),
    **jit_options,
):
    """A jitted (params, images, rng=None) -> tokens function; `jit_options` (e.g.
    in_shardings / out_shardings for a mesh) go to `jax.jit`."""

    def run(params, images, rng=None):
        return generate(
            model,
            params,
            images,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            options=options,
            rng=rng,
        )

    return jax.jit(run, **jit_options)

"""Caption-generation benchmark: KV-cached decoding against a full-prefix re-run.

  python -m mmjax.benchmarks.generate [--size small] [--batch 8] [--tokens 32] [--repeats 3]

On a random-init model of a named size (`mmjax.models.config.SIZES`), in the inference layout
of `mmjax.inference.generate.unrolled` (as the Predictor holds it), times:
  kv_cache   `mmjax.inference.generate` greedy: one jitted loop, one new token per step against the
             cached keys/values, the image's cross-attention keys/values projected once;
  reference  open_clip's CoCa.generate computation: the image encoded once, then every step
             re-runs the text encoder and the multimodal decoder (logits at every position,
             the last one used) on the whole prefix so far. Each prefix length is its own
             jitted step, so the reference does exactly t positions at step t, not a padded
             maximum. `speedup` is against this one;
  reference_fixed  the same re-run as one jitted loop (static shapes, as a non-cached JAX
             decode is usually written): every step runs all --tokens positions of a padded
             buffer, so it does about twice the reference's work (for information);
  beam       `mmjax.inference.generate` beam search (for information).
Every method generates exactly --tokens tokens per caption (EOS is held back by
min_length = max_length = --tokens). Compile time is excluded (one warm-up call each); the
figures are medians over --repeats calls, interleaved across the methods. The greedy
outputs of kv_cache and both references must be identical (exit status 1 otherwise). Prints one
line per method and a final JSON line.
"""

from __future__ import annotations

import json
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.inference.generate import GenerateOptions, first_argmax, make_generate_fn, unrolled
from mmjax.models.coca import CoCa
from mmjax.models.config import DTYPES, SIZES, ModelConfig
from mmjax.runtime import cli

PAD, BOS, EOS = 0, 1, 2


def _prefix_logits(module: CoCa, prefix, caption_tokens):
    """Non-cached decoder logits for every position of `prefix` [B, t] -> [B, t, V]."""
    _, features = module.text_encoder(prefix)
    return module.decoder(features, caption_tokens)


def make_encoder(model: CoCa):
    """Jitted (params, images) -> caption tokens of the image encoder."""
    return jax.jit(
        lambda params, images: model.apply({"params": params}, images, method=CoCa.encode_image)[1]
    )


def make_reference(model: CoCa, tokens: int):
    """A (params, images) -> tokens [B, tokens + 1] greedy decoder without a cache."""
    banned = jnp.zeros(model.cfg.vocab_size, bool).at[jnp.array([PAD, BOS, EOS])].set(True)
    encode = make_encoder(model)

    @jax.jit
    def step(params, prefix, caption_tokens):
        logits = model.apply({"params": params}, prefix, caption_tokens, method=_prefix_logits)
        logits = jnp.where(banned, -jnp.inf, logits[:, -1].astype(jnp.float32))
        return jnp.concatenate([prefix, first_argmax(logits)[:, None]], 1)

    def run(params, images):
        caption_tokens = encode(params, images)
        prefix = jnp.full((images.shape[0], 1), BOS, jnp.int32)
        for _ in range(tokens):  # A new shape (and compile, in the warm-up) per length.
            prefix = step(params, prefix, caption_tokens)
        return prefix

    return run


def make_fixed_reference(model: CoCa, tokens: int):
    """`make_reference` as one jitted loop over a padded buffer of all positions."""
    banned = jnp.zeros(model.cfg.vocab_size, bool).at[jnp.array([PAD, BOS, EOS])].set(True)

    @jax.jit
    def run(params, images):
        _, caption_tokens = model.apply({"params": params}, images, method=CoCa.encode_image)
        buffer = jnp.full((images.shape[0], tokens + 1), PAD, jnp.int32).at[:, 0].set(BOS)

        def step(t, buffer):
            # Padding after t is masked as keys (text) or causally unseen (decoder).
            # Positions 0 .. tokens - 1 predict tokens 1 .. tokens; the last is never fed.
            fed = buffer[:, :tokens]
            logits = model.apply({"params": params}, fed, caption_tokens, method=_prefix_logits)
            logits = jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False)
            logits = jnp.where(banned, -jnp.inf, logits.astype(jnp.float32))
            return buffer.at[:, t].set(first_argmax(logits))

        return jax.lax.fori_loop(1, tokens + 1, step, buffer)

    return run


def _time(fns: dict, repeats: int) -> tuple[dict, dict]:
    """-> (outputs, median seconds) per name. Repeats are interleaved across the methods so
    that load from other processes on the machine skews them alike."""
    outputs = {name: np.asarray(jax.block_until_ready(fn())) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return outputs, {name: float(np.median(t)) for name, t in times.items()}


def run(size: str, batch: int, tokens: int, repeats: int, beam: int, dtype: str, seed: int):
    cfg = ModelConfig.from_mapping(dict(SIZES[size], dtype=dtype))
    cfg.validate()
    if not 1 <= tokens <= cfg.context_length - 1:
        raise ValueError(f"--tokens={tokens} must be in [1, {cfg.context_length - 1}] for {size}")
    model = CoCa(cfg)
    rng = np.random.default_rng(seed)
    images = jnp.asarray(
        rng.integers(0, 256, (batch, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    )
    dummy = jnp.zeros((batch, cfg.context_length), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), images, dummy)["params"])
    # Every method runs the inference layout (layers unrolled, the weights unstacked once, as
    # mmjax.inference.predictor.Predictor holds them), so the speedup is the cache's alone.
    model, params = unrolled(model, params)

    exact = dict(min_length=tokens, max_length=tokens)  # Exactly `tokens` tokens, no EOS.
    methods = {
        "kv_cache": make_generate_fn(
            model, bos_id=BOS, eos_id=EOS, pad_id=PAD, options=GenerateOptions(**exact)
        ),
        "reference": make_reference(model, tokens),
        "reference_fixed": make_fixed_reference(model, tokens),
        f"beam{beam}": make_generate_fn(
            model,
            bos_id=BOS,
            eos_id=EOS,
            pad_id=PAD,
            options=GenerateOptions(method="beam", beam_size=beam, **exact),
        ),
    }
    # The image encoder alone, which both greedy methods run once: the decode-only speedup
    # leaves it out.
    methods["image_encode"] = make_encoder(model)
    outputs, seconds = _time(
        {name: lambda fn=fn: fn(params, images) for name, fn in methods.items()}, repeats
    )
    encode = seconds.pop("image_encode")
    kv, ref = outputs["kv_cache"], outputs["reference"]
    identical = (
        np.array_equal(kv[:, : tokens + 1], ref)
        and np.array_equal(outputs["reference_fixed"], ref)
        and np.all(kv[:, tokens + 1 :] == PAD)
    )
    return {
        "size": size,
        "batch": batch,
        "tokens": tokens,
        "repeats": repeats,
        "dtype": dtype,
        "platform": jax.devices()[0].platform,
        "seconds": seconds,
        "tokens_per_sec": {name: batch * tokens / s for name, s in seconds.items()},
        "speedup": seconds["reference"] / seconds["kv_cache"],
        "image_encode_seconds": encode,
        "decode_speedup": (seconds["reference"] - encode) / (seconds["kv_cache"] - encode),
        "speedup_vs_fixed": seconds["reference_fixed"] / seconds["kv_cache"],
        "greedy_identical": bool(identical),
        "greedy_token_agreement": float(np.mean(kv[:, 1 : tokens + 1] == ref[:, 1:])),
    }


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m mmjax.benchmarks.generate")
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="generated tokens per caption")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--beam", type=int, default=4, help="beam size of the beam timing")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        result = run(
            args.size, args.batch, args.tokens, args.repeats, args.beam, args.dtype, args.seed
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.size}: batch {args.batch}, {args.tokens} tokens per caption, "
        f"{result['dtype']} on {result['platform']}, median of {args.repeats}"
    )
    for name, s in result["seconds"].items():
        print(f"  {name:<15} {s:9.3f} s  {result['tokens_per_sec'][name]:10.1f} tokens/s")
    print(f"  speedup (reference / kv_cache): {result['speedup']:.1f}x")
    print(f"  speedup (reference_fixed / kv_cache): {result['speedup_vs_fixed']:.1f}x")
    print(
        f"  decode-only speedup (less the {result['image_encode_seconds']:.3f} s image encode "
        f"both run): {result['decode_speedup']:.1f}x"
    )
    print(f"  greedy outputs identical: {result['greedy_identical']}")
    print(json.dumps(result))
    return 0 if result["greedy_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())

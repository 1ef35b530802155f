"""AdamW with linear warmup + cosine decay; no weight decay on norms, biases, temperature."""

from __future__ import annotations

import jax
import ml_collections
import optax

# Only matrices that map features decay; norms, biases, the temperature and
# bias of the contrastive head, positions, queries and CLS do not.
DECAYED_LEAVES = ("kernel", "embedding")


def _leaf_name(path) -> str:
    for entry in reversed(path):
        key = getattr(entry, "key", None)
        if isinstance(key, str):
            return key
    return ""


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) in DECAYED_LEAVES, params)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    opt = config.optimizer
    warmup = min(opt.warmup_steps, max(config.total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(config.total_steps, warmup + 1),
        end_value=opt.learning_rate * opt.end_learning_rate_factor,
    )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    opt = config.optimizer
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip),
        optax.adamw(
            learning_rate_schedule(config),
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=decay_mask,
        ),
    )

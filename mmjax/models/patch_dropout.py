"""Patch dropout (FLIP, Li et al. 2023): which patch tokens each training image keeps.

An image's subset is the top `keep` of uniform noise drawn from fold_in(rng, its index in
the global batch). It is therefore a function of the step's PRNG and the example alone:
the same whether the batch runs whole or in micro-batches, however it is sharded, and
again on a resumed run (the train state carries the PRNG).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def keep_indices(rng: jax.Array, example_ids: jax.Array, num_patches: int, keep: int) -> jax.Array:
    """[B] example indices -> [B, keep] int32 patch indices, distinct within each row."""
    noise = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i), (num_patches,)))(
        example_ids
    )
    return jax.lax.top_k(noise, keep)[1].astype(jnp.int32)

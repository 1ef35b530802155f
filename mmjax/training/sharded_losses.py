"""Contrastive losses for a batch split over mesh axes, without materialising B x B logits.

`mmjax.training.losses` computes the full [B_global, B_global] similarity matrix; on a
batch-sharded step XLA then all-gathers the embeddings and every device holds a
B_local x B_global block (plus its gradient).
Here both losses run inside `shard_map` over the batch axes:

- `chunked_sigmoid_loss` (SigLIP): each device scores its images against its own texts, then the
  text shards travel around the device ring with `ppermute`, half the hops each way, so a device
  only ever holds B_local x B_local logits. A custom VJP replays the ring in the backward pass
  (texts travel with their gradient accumulators), so nothing is saved per hop: per-device memory
  is O(B_local^2 + B_local * D) whatever the number of devices.
- `local_softmax_loss` (CLIP): the softmax needs whole rows, so each device all-gathers the
  texts and computes the B_local x B_global logits of its own images, with labels offset by its
  position in the batch; the text->image direction reduces column log-sum-exps across devices
  (B_global-vectors) rather than gathering the images too. Memory O(B_local * B_global + B * D).

- `ring_softmax_loss` (CLIP, `loss.sharded_softmax='ring'`): the text shards go once around
  the ring, each carrying the running log-sum-exp of its columns while every device
  accumulates its rows' one,
  so a device holds B_local x B_local logits only; a custom VJP replays the ring. Memory
  O(B_local^2 + B_local * D), n hops of communication instead of one all-gather.

All equal the unsharded losses on the gathered arrays, value and gradients. Inputs are
[B_global, D] arrays whose batch dimension is split over `batch_axes` (in that order, first axis
major, as `PartitionSpec(batch_axes)` lays it out) and replicated over the other mesh axes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mmjax.training import losses

# loss.sharded_softmax: gather = local_softmax_loss (one all-gather; B_local x B_global logits);
# ring = ring_softmax_loss (n ppermute hops; B_local x B_local logits whatever the ring size).
SHARDED_SOFTMAX = ("gather", "ring")
# Same reason as in mmjax.training.losses: logits feed sigmoids / softmaxes with scale up to 100.
_PRECISION = jax.lax.Precision.HIGHEST

if hasattr(jax, "shard_map"):  # jax >= 0.7: vma checking is `check_vma`.
    _shard_map = functools.partial(jax.shard_map, check_vma=True)
else:  # Older jax: the experimental module, where the same check is `check_rep`.
    from jax.experimental.shard_map import shard_map as _experimental_shard_map

    _shard_map = functools.partial(_experimental_shard_map, check_rep=True)


def _resolve_mesh(mesh):
    """The given mesh, or the one made current by `jax.set_mesh` / `with mesh:`."""
    if mesh is not None:
        return mesh
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        raise ValueError("sharded contrastive loss needs a mesh: pass mesh= or call under set_mesh")
    return mesh


def _split_size(mesh, batch_axes: Sequence[str]) -> int:
    unknown = [a for a in batch_axes if a not in mesh.shape]
    if unknown:
        raise ValueError(f"batch_axes {unknown} are not axes of the mesh {dict(mesh.shape)}")
    return math.prod(mesh.shape[a] for a in batch_axes)


def _check_embeddings(image_emb, text_emb, num_shards: int) -> None:
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"contrastive loss wants two [batch, dim] embeddings of the same shape, got image "
            f"{image_emb.shape} and text {text_emb.shape}"
        )
    if image_emb.shape[0] % num_shards:
        raise ValueError(
            f"batch {image_emb.shape[0]} is not divisible by the {num_shards} batch shards"
        )


def _inputs(image_emb, text_emb, scale, mesh, batch_axes: Sequence[str]):
    """(image, text, f32 scale, mesh, axes, number of batch shards), checked."""
    image_emb, text_emb = jnp.asarray(image_emb), jnp.asarray(text_emb)
    mesh = _resolve_mesh(mesh)
    axes = tuple(batch_axes)
    n = _split_size(mesh, axes)
    _check_embeddings(image_emb, text_emb, n)
    return image_emb, text_emb, jnp.asarray(scale, jnp.float32), mesh, axes, n


def _shard_index(batch_axes: Sequence[str], mesh) -> jax.Array:
    """This device's position along the batch: row-major over `batch_axes`, as P(batch_axes)
    lays the batch dimension out (the first axis is the slowest-moving)."""
    index = jnp.zeros((), jnp.int32)
    for axis in batch_axes:
        index = index * mesh.shape[axis] + jax.lax.axis_index(axis)
    return index


def _shift(x, axes: tuple[str, ...], n: int, offset: int):
    """Sends each device's `x` to the device `offset` places further along the batch ring."""
    perm = [(i, (i + offset) % n) for i in range(n)]
    return jax.lax.ppermute(x, axes, perm)


def _sims(image32: jax.Array, text: jax.Array) -> jax.Array:
    return jnp.einsum("id,jd->ij", image32, text.astype(jnp.float32), precision=_PRECISION)


# ---------------------------------------------------------------------------------------------
# Sigmoid (SigLIP), ring-chunked.
# ---------------------------------------------------------------------------------------------


def _ring_plan(n: int) -> tuple[int, bool]:
    """Hops taken in both directions, and whether one more forward hop is needed.

    The n - 1 remote shards sit at ring offsets +-1 .. +-(n-1)/2 for odd n; for even n the
    shard at offset n/2 is reachable either way, so it is visited once, by the forward texts."""
    both = (n - 1) // 2
    return both, n % 2 == 0


def _negative_loss(image32, text, scale, bias):
    """-sum log sigmoid(-(scale * <I, T> + bias)) over a block with no positive pair."""
    return -jnp.sum(jax.nn.log_sigmoid(-(scale * _sims(image32, text) + bias)))


def _diagonal_signs(size: int) -> jax.Array:
    return 2.0 * jnp.eye(size, dtype=jnp.float32) - 1.0


def _block_grads(image32, text, scale, bias, weight, signs):
    """Gradients of weight * -sum log sigmoid(signs * (scale * I T^T + bias)) for one block:
    (d image, d text, d scale, d bias), the embedding ones in f32."""
    text32 = text.astype(jnp.float32)
    sims = _sims(image32, text32)
    # d/dx -log sigmoid(z x) = -z sigmoid(-z x).
    d_logits = weight * (-signs) * jax.nn.sigmoid(-signs * (scale * sims + bias))
    d_image = scale * jnp.matmul(d_logits, text32, precision=_PRECISION)
    d_text = scale * jnp.matmul(d_logits.T, image32, precision=_PRECISION)
    return d_image, d_text, jnp.sum(d_logits * sims), jnp.sum(d_logits)


@functools.cache
def _ring_sigmoid(axes: tuple[str, ...], n: int, global_batch: int):
    """The per-device body of `chunked_sigmoid_loss` for a ring of n devices: maps the local
    (image, text, scale, bias) to the replicated loss, with a custom VJP that replays the ring."""
    both, extra = _ring_plan(n)

    def forward(image, text, scale, bias):
        image32 = image.astype(jnp.float32)
        signs = _diagonal_signs(image.shape[0])
        own = -jnp.sum(jax.nn.log_sigmoid(signs * (scale * _sims(image32, text) + bias)))

        def hop(_, carry):
            ahead, behind, total = carry
            ahead, behind = _shift(ahead, axes, n, 1), _shift(behind, axes, n, -1)
            total = total + _negative_loss(image32, ahead, scale, bias)
            total = total + _negative_loss(image32, behind, scale, bias)
            return ahead, behind, total

        # fori_loop, not a Python loop: the body (and the compile time) does not grow with n.
        ahead, _, total = jax.lax.fori_loop(0, both, hop, (text, text, own))
        if extra:
            total = total + _negative_loss(image32, _shift(ahead, axes, n, 1), scale, bias)
        return jax.lax.psum(total, axes) / global_batch

    @jax.custom_vjp
    def loss(image, text, scale, bias):
        return forward(image, text, scale, bias)

    def loss_fwd(image, text, scale, bias):
        # Only the inputs are saved; the backward pass recomputes each block's logits.
        return forward(image, text, scale, bias), (image, text, scale, bias)

    def loss_bwd(residuals, g):
        image, text, scale, bias = residuals
        image32 = image.astype(jnp.float32)
        weight = g / global_batch
        d_image, d_own, d_scale, d_bias = _block_grads(
            image32, text, scale, bias, weight, _diagonal_signs(image.shape[0])
        )
        negative = jnp.float32(-1.0)

        def visit(held, held_grad, d_image, d_scale, d_bias):
            # The texts held here belong to another device; their gradient travels with them.
            di, dt, ds, db = _block_grads(image32, held, scale, bias, weight, negative)
            return held_grad + dt, d_image + di, d_scale + ds, d_bias + db

        def hop(_, carry):
            ahead, ahead_grad, behind, behind_grad, d_image, d_scale, d_bias = carry
            ahead, ahead_grad = _shift((ahead, ahead_grad), axes, n, 1)
            behind, behind_grad = _shift((behind, behind_grad), axes, n, -1)
            ahead_grad, d_image, d_scale, d_bias = visit(
                ahead, ahead_grad, d_image, d_scale, d_bias
            )
            behind_grad, d_image, d_scale, d_bias = visit(
                behind, behind_grad, d_image, d_scale, d_bias
            )
            return ahead, ahead_grad, behind, behind_grad, d_image, d_scale, d_bias

        # The forward-travelling texts carry their own diagonal-block gradient from the start;
        # the backward-travelling copy starts empty (0 * d_own keeps the device-varying type).
        carry = (text, d_own, text, 0.0 * d_own, d_image, d_scale, d_bias)
        ahead, ahead_grad, _, behind_grad, d_image, d_scale, d_bias = jax.lax.fori_loop(
            0, both, hop, carry
        )
        ahead_hops = both
        if extra:
            ahead, ahead_grad = _shift((ahead, ahead_grad), axes, n, 1)
            ahead_grad, d_image, d_scale, d_bias = visit(
                ahead, ahead_grad, d_image, d_scale, d_bias
            )
            ahead_hops += 1
        # Each accumulator is now `ahead_hops` / `both` places from its owner: one permute each
        # sends it home.
        d_text = _shift(ahead_grad, axes, n, -ahead_hops)
        if both:
            d_text = d_text + _shift(behind_grad, axes, n, both)
        return (
            d_image.astype(image.dtype),
            d_text.astype(text.dtype),
            jax.lax.psum(d_scale, axes),
            jax.lax.psum(d_bias, axes),
        )

    loss.defvjp(loss_fwd, loss_bwd)
    return loss


def chunked_sigmoid_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    mesh=None,
    batch_axes: Sequence[str],
) -> jax.Array:
    """SigLIP loss over a batch split across `batch_axes`, with B_local x B_local logit blocks.

    Equals `losses.sigmoid_contrastive_loss(image_emb, text_emb, scale, bias)` (sum over all
    B_global^2 pairs / B_global) in value and gradients. `image_emb`, `text_emb`: [B_global, D],
    batch split over `batch_axes` (row-major), replicated over the other axes of `mesh` (a Mesh
    or AbstractMesh; None: the current one from `jax.set_mesh`). `scale`, `bias`: scalars.
    Returns a replicated f32 scalar.
    """
    image_emb, text_emb, scale, mesh, axes, n = _inputs(
        image_emb, text_emb, scale, mesh, batch_axes
    )
    bias = jnp.asarray(bias, jnp.float32)
    if n == 1:
        return losses.sigmoid_contrastive_loss(image_emb, text_emb, scale, bias)
    body = _ring_sigmoid(axes, n, image_emb.shape[0])
    rows = P(axes, None)
    sharded = _shard_map(body, mesh=mesh, in_specs=(rows, rows, P(), P()), out_specs=P())
    return sharded(image_emb, text_emb, scale, bias)


# ---------------------------------------------------------------------------------------------
# Softmax (CLIP), local-loss form.
# ---------------------------------------------------------------------------------------------


def local_softmax_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    scale: jax.Array,
    *,
    mesh=None,
    batch_axes: Sequence[str],
) -> jax.Array:
    """CLIP loss over a batch split across `batch_axes`, with B_local x B_global logits.

    Each device all-gathers the texts and scores its own images against all of them: its rows
    of the global logit matrix, with labels offset by its position in the batch. Image->text
    rows are complete locally; the text->image direction needs whole columns, so their
    log-sum-exp is reduced across devices (a B_global-vector pmax and psum) instead of gathering
    the images too, which would double the gathered embeddings and the logits.

    Equals `losses.softmax_contrastive_loss(image_emb, text_emb, scale)` in value and gradients
    (gradients reach the other devices' texts through the all-gather's transpose, a
    reduce-scatter). Same input layout and mesh rules as `chunked_sigmoid_loss`.
    """
    image_emb, text_emb, scale, mesh, axes, n = _inputs(
        image_emb, text_emb, scale, mesh, batch_axes
    )
    if n == 1:
        return losses.softmax_contrastive_loss(image_emb, text_emb, scale)
    global_batch = image_emb.shape[0]

    def body(image, text, scale):
        # Tiled all_gather over several axes concatenates row-major over them, like P(axes).
        all_texts = jax.lax.all_gather(text, axes, tiled=True)
        logits = scale * _sims(image.astype(jnp.float32), all_texts)  # [B_local, B_global]
        local = image.shape[0]
        labels = _shard_index(axes, mesh) * local + jnp.arange(local)
        # Row r is local pair r; its positive sits in global column labels[r].
        positives = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
        image_to_text = jnp.sum(jax.nn.logsumexp(logits, axis=1) - positives)
        # Column log-sum-exp over every device's rows. The shift only keeps exp() in range, so
        # it carries no gradient (pmax has none); psum's transpose routes the rest back.
        shift = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=0)), axes)
        column_sums = jax.lax.psum(jnp.sum(jnp.exp(logits - shift), axis=0), axes)
        column_lse = shift + jnp.log(column_sums)  # [B_global], the same on every device
        # Each device counts only the columns of its own texts, so each column counts once.
        text_to_image = jnp.sum(column_lse[labels] - positives)
        return jax.lax.psum(image_to_text + text_to_image, axes) / (2 * global_batch)

    rows = P(axes, None)
    sharded = _shard_map(body, mesh=mesh, in_specs=(rows, rows, P()), out_specs=P())
    return sharded(image_emb, text_emb, scale)


# ---------------------------------------------------------------------------------------------
# Softmax (CLIP), ring with running log-sum-exps.
# ---------------------------------------------------------------------------------------------


@functools.cache
def _ring_softmax(axes: tuple[str, ...], n: int, global_batch: int):
    """The per-device body of `ring_softmax_loss` for a ring of n devices: local (image, text,
    scale) -> the replicated loss, with a custom VJP that replays the ring."""

    def block_logits(image32, text, scale):
        return scale * _sims(image32, text)

    def forward(image, text, scale):
        image32 = image.astype(jnp.float32)
        local = image.shape[0]
        positives = scale * jnp.sum(image32 * text.astype(jnp.float32), axis=1)
        empty = jnp.full((local,), -jnp.inf, jnp.float32) + 0.0 * positives

        def hop(k, carry):
            held, held_lse, row_lse = carry  # Texts of device i-k, their column log-sum-exps.
            logits = block_logits(image32, held, scale)
            row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(logits, axis=1))
            held_lse = jnp.logaddexp(held_lse, jax.nn.logsumexp(logits, axis=0))
            held, held_lse = _shift((held, held_lse), axes, n, 1)
            return held, held_lse, row_lse

        # n hops: every text shard visits every device and comes home with whole columns.
        _, column_lse, row_lse = jax.lax.fori_loop(0, n, hop, (text, empty, empty))
        total = jnp.sum(row_lse - positives) + jnp.sum(column_lse - positives)
        loss = jax.lax.psum(total, axes) / (2 * global_batch)
        return loss, (row_lse, column_lse)

    @jax.custom_vjp
    def loss(image, text, scale):
        return forward(image, text, scale)[0]

    def loss_fwd(image, text, scale):
        value, (row_lse, column_lse) = forward(image, text, scale)
        # Saved: the inputs and two B_local-vectors; each block's logits are recomputed.
        return value, (image, text, scale, row_lse, column_lse)

    def loss_bwd(residuals, g):
        image, text, scale, row_lse, column_lse = residuals
        image32 = image.astype(jnp.float32)
        weight = g / (2 * global_batch)
        eye = jnp.eye(image.shape[0], dtype=jnp.float32)

        def hop(k, carry):
            held, held_lse, held_grad, d_image, d_scale = carry
            held32 = held.astype(jnp.float32)
            sims = _sims(image32, held)
            logits = scale * sims
            # d/dlogits of row and column log-sum-exps: their softmaxes; the positives (the
            # diagonal of the own block, k = 0) enter both directions with -1.
            d_logits = weight * (
                jnp.exp(logits - row_lse[:, None])
                + jnp.exp(logits - held_lse[None, :])
                - 2.0 * jnp.where(k == 0, eye, 0.0)
            )
            d_image = d_image + scale * jnp.matmul(d_logits, held32, precision=_PRECISION)
            held_grad = held_grad + scale * jnp.matmul(d_logits.T, image32, precision=_PRECISION)
            d_scale = d_scale + jnp.sum(d_logits * sims)
            held, held_lse, held_grad = _shift((held, held_lse, held_grad), axes, n, 1)
            return held, held_lse, held_grad, d_image, d_scale

        zeros = 0.0 * image32
        carry = (text, column_lse, zeros, zeros, jnp.sum(zeros[0, :1]))
        _, _, d_text, d_image, d_scale = jax.lax.fori_loop(0, n, hop, carry)
        return (
            d_image.astype(image.dtype),
            d_text.astype(text.dtype),
            jax.lax.psum(d_scale, axes),
        )

    loss.defvjp(loss_fwd, loss_bwd)
    return loss


def ring_softmax_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    scale: jax.Array,
    *,
    mesh=None,
    batch_axes: Sequence[str],
) -> jax.Array:
    """CLIP loss over a batch split across `batch_axes`, at memory constant in the ring size.

    The text shards travel once around the device ring (`ppermute`), each carrying the running
    log-sum-exp of its columns; every device keeps the running log-sum-exp of its image rows.
    A device therefore only ever holds B_local x B_local logits and B_local-vectors; the custom
    VJP replays the ring (texts travel with their gradient accumulators and column log-sum-exps),
    saving nothing per hop. n hops instead of `local_softmax_loss`'s one all-gather: the price
    of O(B_local^2 + B_local * D) memory per device. Equals
    `losses.softmax_contrastive_loss(image_emb, text_emb, scale)` in value and gradients; same
    input layout and mesh rules as `chunked_sigmoid_loss`.
    """
    image_emb, text_emb, scale, mesh, axes, n = _inputs(
        image_emb, text_emb, scale, mesh, batch_axes
    )
    if n == 1:
        return losses.softmax_contrastive_loss(image_emb, text_emb, scale)
    body = _ring_softmax(axes, n, image_emb.shape[0])
    rows = P(axes, None)
    sharded = _shard_map(body, mesh=mesh, in_specs=(rows, rows, P()), out_specs=P())
    return sharded(image_emb, text_emb, scale)


# ---------------------------------------------------------------------------------------------
# Dispatch by config name, like losses.contrastive_loss.
# ---------------------------------------------------------------------------------------------


def sharded_contrastive_loss(
    name: str,
    image_emb: jax.Array,
    text_emb: jax.Array,
    scale: jax.Array,
    bias: jax.Array | None = None,
    *,
    mesh=None,
    batch_axes: Sequence[str],
    softmax: str = "gather",
) -> jax.Array:
    """`losses.contrastive_loss(name, ...)` for a batch split over `batch_axes` of `mesh`:
    'sigmoid' -> `chunked_sigmoid_loss`, 'softmax' -> `local_softmax_loss`, or
    `ring_softmax_loss` with softmax='ring' (loss.sharded_softmax; bias unused). With
    a batch split 1 way (or no batch axes) it is the plain loss. Same errors as contrastive_loss.
    """
    if name not in losses.LOSSES:
        allowed = ", ".join(repr(k) for k in sorted(losses.LOSSES))
        raise ValueError(f"loss.contrastive={name!r} is unknown; allowed: {allowed}")
    if name == "sigmoid" and bias is None:
        raise ValueError("loss.contrastive='sigmoid' needs a bias (SigLIP learns one, init -10)")
    axes = tuple(batch_axes)
    if not axes or _split_size(_resolve_mesh(mesh), axes) == 1:
        return losses.contrastive_loss(name, image_emb, text_emb, scale, bias)
    if name == "sigmoid":
        return chunked_sigmoid_loss(image_emb, text_emb, scale, bias, mesh=mesh, batch_axes=axes)
    if softmax not in SHARDED_SOFTMAX:
        raise ValueError(f"loss.sharded_softmax={softmax!r} is unknown; allowed: {SHARDED_SOFTMAX}")
    if softmax == "ring":
        return ring_softmax_loss(image_emb, text_emb, scale, mesh=mesh, batch_axes=axes)
    return local_softmax_loss(image_emb, text_emb, scale, mesh=mesh, batch_axes=axes)

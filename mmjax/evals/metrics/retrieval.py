"""Host-side evaluation metrics: image-text retrieval recall / ranks and caption BLEU / exact match.

Ties in retrieval are scored as the expectation over a uniformly random order of the tied items:
neither the model's favour (rank = 1 + #strictly better, which gives collapsed embeddings a perfect
score) nor against it (rank = #better-or-equal, which makes duplicate captions count as misses).
So a constant embedding scores chance level (R@1 = 1/N, mean rank (N+1)/2), and recall is a
fraction that need not be a multiple of 1/N.

Scores within TIE_TOLERANCE (relative to the row's largest |score|) of each other are tied: the same
caption embedded at two batch positions, or on a different mesh, differs in its last bits, and an
exact comparison would turn such ties into arbitrary strict orders that change with the device
count.
"""

from collections.abc import Sequence

import numpy as np
import sacrebleu

RECALL_AT = (1, 5, 10)
TIE_TOLERANCE = 1e-5


def _first_hit_counts(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per query row: (#negatives strictly above the best positive, #negatives tied with it,
    #positives tied with it). `scores` [Q, N]; `positive` [Q, N] bool with >= 1 True per row."""
    best = np.max(np.where(positive, scores, -np.inf), axis=1, keepdims=True)
    tolerance = TIE_TOLERANCE * np.max(np.abs(scores), axis=1, keepdims=True)
    # All negatives: no positive is above the best positive.
    above = np.sum(scores > best + tolerance, axis=1)
    at_best = np.abs(scores - best) <= tolerance
    tied_positive = np.sum(at_best & positive, axis=1)
    tied_negative = np.sum(at_best & ~positive, axis=1)
    return above, tied_negative, tied_positive


def _expected_hit_at(
    k: int, above: np.ndarray, tied_neg: np.ndarray, tied_pos: np.ndarray
) -> np.ndarray:
    """Probability that a positive is within the top k when tied items are ordered at random.

    With `above` negatives certainly ahead, k - above slots remain in the tied block; all of them
    go to negatives with probability prod_t (tied_neg - t) / (tied_neg + tied_pos - t).
    """
    slots = k - above
    all_negative = np.ones(above.shape, np.float64)
    for t in range(k):
        draw = np.maximum(tied_neg - t, 0) / np.maximum(tied_neg + tied_pos - t, 1)
        all_negative *= np.where(t < slots, draw, 1.0)
    return np.where(slots > 0, 1.0 - all_negative, 0.0)


def _retrieve(
    queries: np.ndarray, targets: np.ndarray, groups: np.ndarray | None, chunk_size: int
) -> dict[str, np.ndarray]:
    """Per-query expected ranks and hit probabilities; query i's match is target i, and, when
    `groups` is given, the `samecap` hits are all targets in query i's group."""
    num = queries.shape[0]
    rank = np.empty(num, np.float64)
    hits = {k: np.empty(num, np.float64) for k in RECALL_AT}
    group_hits = {k: np.empty(num, np.float64) for k in RECALL_AT}
    for start in range(0, num, chunk_size):
        stop = min(start + chunk_size, num)
        # One [chunk, N] block at a time: 50k x 50k f32 scores would be 10 GB at once; a 512-row
        # block of 50k is 100 MB (a few such temporaries live at once).
        scores = queries[start:stop] @ targets.T
        rows = np.arange(stop - start)
        diagonal = np.zeros(scores.shape, bool)
        diagonal[rows, rows + start] = True

        above, tied_neg, tied_pos = _first_hit_counts(scores, diagonal)
        # Expected position of the match among its tied_neg tied negatives: half of them go first.
        rank[start:stop] = 1.0 + above + tied_neg / 2.0
        for k in RECALL_AT:
            hits[k][start:stop] = _expected_hit_at(k, above, tied_neg, tied_pos)

        if groups is not None:
            same = groups[start:stop, None] == groups[None, :]
            counts = _first_hit_counts(scores, same)
            for k in RECALL_AT:
                group_hits[k][start:stop] = _expected_hit_at(k, *counts)
    out = {"rank": rank, **{f"r{k}": hits[k] for k in RECALL_AT}}
    if groups is not None:
        out.update({f"r{k}_samecap": group_hits[k] for k in RECALL_AT})
    return out


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    captions: Sequence[str] | None = None,
    *,
    chunk_size: int = 512,
) -> dict[str, float]:
    """Recall@{1,5,10} and mean / median 1-based rank in both directions; image i pairs with text i.

    Scores are dot products, so pass L2-normalised embeddings for cosine similarity. With
    `captions`, also `*_samecap` recalls, which count any item sharing the query pair's caption as a
    hit (duplicate captions otherwise cap index-based recall well below 1). i2t = image queries
    ranking texts, t2i = text queries ranking images.
    """
    image = np.asarray(image_emb, np.float32)
    text = np.asarray(text_emb, np.float32)
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(
            "retrieval wants image and text embeddings of the same [N, D] shape, "
            f"got {image.shape} and {text.shape}"
        )
    if image.shape[0] == 0:
        raise ValueError("retrieval needs at least one image-text pair, got 0")
    # NaN compares false with everything, which would silently rank the match first.
    if not (np.all(np.isfinite(image)) and np.all(np.isfinite(text))):
        raise ValueError("retrieval embeddings contain NaN or inf")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    groups = None
    if captions is not None:
        if len(captions) != image.shape[0]:
            raise ValueError(f"got {len(captions)} captions for {image.shape[0]} image-text pairs")
        # Integer ids so the per-chunk "same caption" mask is a cheap array comparison.
        ids: dict[str, int] = {}
        groups = np.array([ids.setdefault(caption, len(ids)) for caption in captions], np.int64)

    metrics = {}
    for name, queries, targets in (("i2t", image, text), ("t2i", text, image)):
        result = _retrieve(queries, targets, groups, chunk_size)
        rank = result.pop("rank")
        metrics[f"{name}_mean_rank"] = float(np.mean(rank))
        metrics[f"{name}_median_rank"] = float(np.median(rank))
        metrics.update({f"{name}_{key}": float(np.mean(value)) for key, value in result.items()})
    return metrics


def grouped_retrieval_metrics(
    image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray, *, chunk_size: int = 512
) -> dict[str, float]:
    """Retrieval with several captions per image (COCO, Flickr30k: five), the CLIP paper's
    rule: an image query hits when any of its captions is in the top K (i2t), a caption query
    when its image is (t2i). Ranks are those of the first hit; ties as in retrieval_metrics.

    `image_emb` [I, D] one row per image, `text_emb` [T, D], `text_image` [T]: the image row
    of each caption; every image needs at least one caption.
    """
    image = np.asarray(image_emb, np.float32)
    text = np.asarray(text_emb, np.float32)
    owner = np.asarray(text_image, np.int64)
    if image.ndim != 2 or text.ndim != 2 or image.shape[1] != text.shape[1]:
        raise ValueError(f"retrieval embeddings of shapes {image.shape} and {text.shape}")
    if owner.shape != (text.shape[0],) or owner.min(initial=0) < 0 or (
        owner.max(initial=-1) >= image.shape[0]
    ):
        raise ValueError("text_image must give each caption's image row in [0, images)")
    if image.shape[0] == 0 or len(np.unique(owner)) != image.shape[0]:
        raise ValueError("every image needs at least one caption")
    if not (np.all(np.isfinite(image)) and np.all(np.isfinite(text))):
        raise ValueError("retrieval embeddings contain NaN or inf")
    metrics = {}
    for name, queries, targets in (("i2t", image, text), ("t2i", text, image)):
        num = queries.shape[0]
        rank = np.empty(num, np.float64)
        hits = {k: np.empty(num, np.float64) for k in RECALL_AT}
        for start in range(0, num, chunk_size):
            stop = min(start + chunk_size, num)
            scores = queries[start:stop] @ targets.T
            rows = np.arange(start, stop)
            if name == "i2t":
                positive = owner[None, :] == rows[:, None]
            else:
                positive = np.arange(targets.shape[0])[None, :] == owner[rows, None]
            above, tied_neg, tied_pos = _first_hit_counts(scores, positive)
            rank[start:stop] = 1.0 + above + tied_neg / (tied_pos + 1.0)
            for k in RECALL_AT:
                hits[k][start:stop] = _expected_hit_at(k, above, tied_neg, tied_pos)
        metrics[f"{name}_mean_rank"] = float(np.mean(rank))
        metrics[f"{name}_median_rank"] = float(np.median(rank))
        metrics.update({f"{name}_r{k}": float(np.mean(hits[k])) for k in RECALL_AT})
    return metrics


def _normalise_caption(text: str) -> str:
    return " ".join(text.split()).lower()


def caption_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-4 (sacrebleu defaults: 13a tokenisation, case-sensitive) as a fraction in [0, 1],
    and the fraction of predictions equal to their reference up to case and whitespace.

    One reference per prediction. BLEU-4 is 0 for a corpus without any 4-gram (all captions under
    four tokens), even when every prediction is right; caption_exact covers that case.
    """
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predicted captions for {len(references)} references"
        )
    if not predictions:
        raise ValueError("caption metrics need at least one prediction, got 0")
    for name, texts in (("predictions", predictions), ("references", references)):
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"caption {name} must all be str")
    bleu = sacrebleu.corpus_bleu(predictions, [references])
    exact = [
        _normalise_caption(p) == _normalise_caption(r)
        for p, r in zip(predictions, references, strict=True)
    ]
    return {"caption_bleu4": bleu.score / 100.0, "caption_exact": float(np.mean(exact))}

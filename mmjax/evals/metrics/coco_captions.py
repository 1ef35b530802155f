"""COCO caption metrics (BLEU-1..4, CIDEr-D, ROUGE-L) computed in-process, without Java.

The scores reproduce pycocoevalcap's `Bleu(4)`, `Cider` and `Rouge` given the same token lists:

- BLEU: corpus BLEU over all images. Clipped n-gram counts (a candidate n-gram counts at most as
  often as in the reference that holds it most), brevity penalty against the sum over images of
  the "closest" reference length (ties to the shorter one), and pycocoevalcap's smoothing: every
  precision is (correct + 1e-15) / (guessed + 1e-9).
- CIDEr-D: n = 1..4 TF-IDF vectors, document frequency counted over the references of the
  evaluated set (a reference set is one document), IDF = log(#images) - log(max(1, df)),
  cosine with the hypothesis weights clipped to the reference weights, a Gaussian length
  penalty with sigma 6, the mean over n, the mean over references, x10, the mean over images.
  As in pycocoevalcap the "length" in the penalty is the number of bigrams (words - 1).
- ROUGE-L: per image, the longest common subsequence with each reference gives a precision and
  a recall; the F-measure (beta 1.2) of the best precision and the best recall (each maxed over
  references on its own), averaged over images.

Differences: pycocoevalcap splits strings on spaces, so an empty caption is one empty token
there; here an empty caption is no tokens and has ROUGE-L 0 against anything (pycocoevalcap
scores an empty candidate 1 against an empty reference). `tokenize` is a regex approximation of
the Stanford PTB tokenizer, see its docstring.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

MAX_N = 4  # BLEU-4 and CIDEr-D both use 1- to 4-grams.
_CIDER_SIGMA = 6.0
_ROUGE_BETA = 1.2
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's BLEU smoothing of numerator and denominator.

# Clitics the PTB tokenizer splits off a word: "dog's" -> "dog 's", "don't" -> "do n't".
_NEGATION = re.compile(r"(?<=\w)(n't)\b")
_CLITIC = re.compile(r"(?<=\w)('(?:s|re|ve|ll|d|m))\b")
_TOKEN = re.compile(
    r"n't|'(?:s|re|ve|ll|d|m)\b"  # clitics split off above
    r"|\d+(?:[.,]\d+)+"  # 3.5, 1,000: one token
    r"|\w+(?:-\w+)*"  # words; hyphenated words stay whole, as in PTB
    r"|\S"  # any other symbol on its own
)
# What pycocoevalcap drops after PTB tokenization (quotes, brackets, . , ; : ! ? - and the like),
# as single characters, plus the Unicode quotes and ellipsis PTB would turn into them.
_DROPPED = frozenset(".,;:!?-'`\"()[]{}\u2018\u2019\u201c\u201d\u2026\u2013\u2014")


def tokenize(text: str) -> list[str]:
    """COCO-style tokens of a caption: lower-cased, punctuation split off and dropped.

    Approximates the Stanford PTBTokenizer + punctuation removal that pycocoevalcap applies:
    clitics are split ("man's" -> "man 's", "isn't" -> "is n't"), hyphenated words and numbers
    like "3.5" stay whole, other symbols ("&", "$", "%") become tokens of their own, and the
    punctuation pycocoevalcap removes is dropped. Unlike PTB, a period is always dropped (PTB keeps
    it in abbreviations such as "st."), square brackets are dropped (PTB keeps them as "-lsb-"),
    and "cannot"/"gonna"-style splits are not made.
    """
    if not isinstance(text, str):
        raise ValueError(f"tokenize expects a str, got {type(text).__name__}")
    text = text.lower().replace("\u2019", "'")
    text = _CLITIC.sub(r" \1", _NEGATION.sub(r" \1", text))
    return [token for token in _TOKEN.findall(text) if token not in _DROPPED]


def caption_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """BLEU-1..4, CIDEr(-D) and ROUGE-L of one predicted caption per image against its references.

    `references[i]` holds one or more captions of image i. Captions are tokenized with `tokenize`.
    """
    _check_lengths(predictions, references)
    for i, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise ValueError(f"predictions[{i}] must be a str, got {type(prediction).__name__}")
    for i, refs in enumerate(references):
        _check_references(i, refs)
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise ValueError(f"references[{i}][{j}] must be a str, got {type(ref).__name__}")
    return caption_scores_tokenized(
        [tokenize(p) for p in predictions], [[tokenize(r) for r in refs] for refs in references]
    )


def caption_scores_tokenized(
    predictions: list[list[str]], references: list[list[list[str]]]
) -> dict[str, float]:
    """`caption_scores` on captions that are already token lists (the parity test's entry)."""
    _check_lengths(predictions, references)
    for i, prediction in enumerate(predictions):
        _check_tokens(f"predictions[{i}]", prediction)
    for i, refs in enumerate(references):
        _check_references(i, refs)
        for j, ref in enumerate(refs):
            _check_tokens(f"references[{i}][{j}]", ref)

    num_images = len(predictions)
    ref_image = np.repeat(np.arange(num_images), [len(refs) for refs in references])
    table = _NgramTable(list(predictions) + [ref for refs in references for ref in refs])
    scores = _bleu(table, num_images, ref_image)
    scores["cider"] = _cider(table, num_images, ref_image)
    scores["rouge_l"] = _rouge_l(predictions, references)
    return scores


def _check_lengths(predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} reference lists; "
            "need one prediction per image"
        )
    if not predictions:
        raise ValueError("no predictions to score")


def _check_references(i: int, refs) -> None:
    if isinstance(refs, str) or not isinstance(refs, Sequence):
        raise ValueError(f"references[{i}] must be a list of captions, got {type(refs).__name__}")
    if not refs:
        raise ValueError(f"image {i} has no references")


def _check_tokens(name: str, tokens) -> None:
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise ValueError(f"{name} must be a list of str tokens, got {type(tokens).__name__}")
    for token in tokens:
        if not isinstance(token, str):
            raise ValueError(f"{name} holds a non-str token of type {type(token).__name__}")


class _NgramTable:
    """The distinct 1..4-grams of every sentence with their counts, as flat integer arrays.

    N-grams get dense integer ids (order by order, from the id of the (k-1)-gram and the next
    word) so that counting, clipping and matching are sorts and bincounts instead of dicts.
    Attributes: `lengths[s]`; `num_grams`; `gram_order[g]` (1..4); per (sentence, n-gram) entry,
    sorted by (sentence, n-gram): `sentence`, `gram`, `count`.
    """

    def __init__(self, sentences: list[list[str]]):
        vocab: dict[str, int] = {}
        words = np.array(
            [vocab.setdefault(w, len(vocab)) for s in sentences for w in s], dtype=np.int64
        )
        self.lengths = np.array([len(s) for s in sentences], dtype=np.int64)
        sentence_of = np.repeat(np.arange(len(sentences)), self.lengths)
        starts = np.cumsum(self.lengths) - self.lengths
        # Words from each position to the end of its sentence: a k-gram starts where this >= k.
        remaining = self.lengths[sentence_of] - (np.arange(len(words)) - starts[sentence_of])

        codes = words  # Dense id of the k-gram starting at each position (k = 1 here).
        positions = np.arange(len(words))
        all_positions, all_grams, order_sizes = [], [], []
        offset = 0
        for k in range(1, MAX_N + 1):
            if k > 1:
                positions = positions[remaining[positions] >= k]
                # < (#distinct (k-1)-grams) * |vocab| <= #words^2: fits int64.
                pair = codes[positions] * max(len(vocab), 1) + words[positions + k - 1]
                distinct, dense = np.unique(pair, return_inverse=True)
                codes = np.full(len(words), -1, dtype=np.int64)
                codes[positions] = dense
                size = len(distinct)
            else:
                size = len(vocab)
            all_positions.append(positions)
            all_grams.append(codes[positions] + offset)
            order_sizes.append(size)
            offset += size
        self.num_grams = offset
        self.gram_order = np.repeat(np.arange(1, MAX_N + 1), order_sizes)

        key = sentence_of[np.concatenate(all_positions)] * self.num_grams + np.concatenate(
            all_grams
        )
        key, self.count = np.unique(key, return_counts=True)
        self.sentence, self.gram = np.divmod(key, self.num_grams)


def _bleu(table: _NgramTable, num_images: int, ref_image: np.ndarray) -> dict[str, float]:
    is_hyp = table.sentence < num_images
    hyp_key = table.sentence[is_hyp] * table.num_grams + table.gram[is_hyp]
    hyp_count = table.count[is_hyp]
    ref_key, ref_max = _max_ref_counts(table, num_images, ref_image)
    clipped = np.minimum(hyp_count, _lookup(ref_key, ref_max, hyp_key))
    hyp_order = table.gram_order[table.gram[is_hyp]] - 1
    correct = np.bincount(hyp_order, weights=clipped, minlength=MAX_N)

    hyp_len = table.lengths[:num_images]
    guess = np.array([np.maximum(hyp_len - k + 1, 0).sum() for k in range(1, MAX_N + 1)])
    # Per image the reference length closest to the hypothesis length, the shorter on a tie:
    # minimise |ref - hyp| * (longest + 1) + ref within each image's (contiguous) references.
    ref_len = table.lengths[num_images:]
    base = int(ref_len.max()) + 1
    closeness = np.abs(ref_len - hyp_len[ref_image]) * base + ref_len
    first_ref = np.searchsorted(ref_image, np.arange(num_images))
    total_ref_len = float((np.minimum.reduceat(closeness, first_ref) % base).sum())
    total_hyp_len = float(hyp_len.sum())

    ratio = (total_hyp_len + _TINY) / (total_ref_len + _SMALL)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = {}, 1.0
    for k in range(MAX_N):
        product *= (float(correct[k]) + _TINY) / (float(guess[k]) + _SMALL)
        scores[f"bleu{k + 1}"] = product ** (1 / (k + 1)) * brevity
    return scores


def _max_ref_counts(
    table: _NgramTable, num_images: int, ref_image: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys image * num_grams + gram of every n-gram in an image's references, and the
    most times any one reference of that image holds it."""
    is_ref = table.sentence >= num_images
    image = ref_image[table.sentence[is_ref] - num_images]
    key = image * table.num_grams + table.gram[is_ref]
    count = table.count[is_ref]
    order = np.lexsort((count, key))
    key, count = key[order], count[order]
    last = np.ones(len(key), dtype=bool)
    last[:-1] = key[1:] != key[:-1]
    return key[last], count[last]


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """values[keys == q] for each q of `query` (keys sorted and unique), 0 where absent."""
    if len(keys) == 0:
        return np.zeros(len(query), dtype=values.dtype)
    at = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[at] == query, values[at], 0)


def _cider(table: _NgramTable, num_images: int, ref_image: np.ndarray) -> float:
    # Document frequency: in how many images' reference sets each n-gram occurs.
    image_gram_key, _ = _max_ref_counts(table, num_images, ref_image)
    df = np.bincount(image_gram_key % table.num_grams, minlength=table.num_grams)
    idf = math.log(float(num_images)) - np.log(np.maximum(df, 1.0))
    weight = table.count * idf[table.gram]
    order = table.gram_order[table.gram] - 1

    num_sentences = len(table.lengths)
    norm = np.sqrt(
        np.bincount(
            table.sentence * MAX_N + order, weights=weight**2, minlength=num_sentences * MAX_N
        )
    ).reshape(num_sentences, MAX_N)

    # Clipped dot product: sum over shared n-grams of min(w_hyp, w_ref) * w_ref, per reference.
    is_hyp = table.sentence < num_images
    hyp_key = table.sentence[is_hyp] * table.num_grams + table.gram[is_hyp]
    is_ref = ~is_hyp
    ref_sentence = table.sentence[is_ref] - num_images
    ref_key = ref_image[ref_sentence] * table.num_grams + table.gram[is_ref]
    ref_weight = weight[is_ref]
    hyp_weight = _lookup(hyp_key, weight[is_hyp], ref_key)
    num_refs = len(ref_image)
    dot = np.bincount(
        ref_sentence * MAX_N + order[is_ref],
        weights=np.minimum(hyp_weight, ref_weight) * ref_weight,
        minlength=num_refs * MAX_N,
    ).reshape(num_refs, MAX_N)
    denominator = norm[:num_images][ref_image] * norm[num_images:]
    cosine = np.divide(dot, denominator, out=np.zeros_like(dot), where=denominator != 0)

    bigrams = np.maximum(table.lengths - 1, 0)  # pycocoevalcap's "length" counts bigrams.
    delta = (bigrams[:num_images][ref_image] - bigrams[num_images:]).astype(np.float64)
    per_ref = cosine.mean(axis=1) * np.exp(-(delta**2) / (2 * _CIDER_SIGMA**2))
    refs_per_image = np.bincount(ref_image, minlength=num_images)
    per_image = np.bincount(ref_image, weights=per_ref, minlength=num_images) / refs_per_image
    return float(np.mean(per_image * 10.0))


def _lcs_length(masks: dict[str, int], length: int, other: list[str]) -> int:
    """Length of the longest common subsequence of a sequence (given as its `masks`: bit i of
    masks[w] set where word i is w) and `other`, by the bit-parallel recurrence of Allison-Dix /
    Hyyrö: a zero bit of `state` marks a position where the LCS grows."""
    full = (1 << length) - 1
    state = full
    for word in other:
        matches = state & masks.get(word, 0)
        state = ((state + matches) | (state - matches)) & full
    return length - state.bit_count()


def _rouge_l(predictions: list[list[str]], references: list[list[list[str]]]) -> float:
    beta2 = _ROUGE_BETA**2
    scores = []
    for candidate, refs in zip(predictions, references):
        masks: dict[str, int] = {}
        for i, word in enumerate(candidate):
            masks[word] = masks.get(word, 0) | (1 << i)
        precision = recall = 0.0
        for ref in refs:
            lcs = _lcs_length(masks, len(candidate), ref)
            if lcs:  # An empty candidate or reference shares nothing.
                precision = max(precision, lcs / len(candidate))
                recall = max(recall, lcs / len(ref))
        if precision and recall:
            scores.append((1 + beta2) * precision * recall / (recall + beta2 * precision))
        else:
            scores.append(0.0)
    return float(np.mean(scores))

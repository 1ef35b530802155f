"""Retrieval and caption metrics on hand-built cases with known answers."""

import itertools

import numpy as np
import pytest
import sacrebleu

from mmjax.evals.metrics.retrieval import caption_metrics, retrieval_metrics


def _from_scores(scores):
    """Embeddings with image-text scores exactly `scores`: image i = e_i, text j = column j."""
    scores = np.asarray(scores, np.float32)
    return np.eye(len(scores), dtype=np.float32), scores.T.copy()


def _brute_force(scores, captions, k_values=(1, 5, 10)):
    """Average over every tie-breaking order: sort targets by score with ties broken by a random
    permutation, enumerated exhaustively. Returns per-query mean ranks and hit rates."""
    scores = np.asarray(scores, np.float64)
    n = len(scores)
    orders = list(itertools.permutations(range(n)))
    ranks = np.zeros(n)
    hits = {k: np.zeros(n) for k in k_values}
    same_hits = {k: np.zeros(n) for k in k_values}
    for q in range(n):
        for order in orders:
            tie_key = {target: position for position, target in enumerate(order)}
            ranking = sorted(range(n), key=lambda t: (-scores[q, t], tie_key[t]))
            rank = ranking.index(q) + 1
            first_same = 1 + min(i for i, t in enumerate(ranking) if captions[t] == captions[q])
            ranks[q] += rank / len(orders)
            for k in k_values:
                hits[k][q] += (rank <= k) / len(orders)
                same_hits[k][q] += (first_same <= k) / len(orders)
    return ranks, hits, same_hits


def test_identity_embeddings_are_perfect():
    embeddings = np.eye(12, dtype=np.float32)
    metrics = retrieval_metrics(
        embeddings, embeddings, captions=[f"caption {i}" for i in range(12)]
    )
    for direction in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert metrics[f"{direction}_r{k}"] == 1.0
            assert metrics[f"{direction}_r{k}_samecap"] == 1.0
        assert metrics[f"{direction}_mean_rank"] == 1.0
        assert metrics[f"{direction}_median_rank"] == 1.0


def test_keys_without_captions():
    metrics = retrieval_metrics(np.eye(3), np.eye(3))
    assert set(metrics) == {
        f"{d}_{m}" for d in ("i2t", "t2i") for m in ("r1", "r5", "r10", "mean_rank", "median_rank")
    }
    assert all(type(v) is float for v in metrics.values())


def test_hand_computed_ranks():
    # Distinct scores; ranks worked out by hand from rows (i2t) and columns (t2i).
    scores = [
        [0.9, 0.1, 0.5, 0.3],  # image 0: its text scores highest -> rank 1
        [0.8, 0.2, 0.7, 0.6],  # image 1: 0.8, 0.7, 0.6 beat 0.2 -> rank 4
        [0.1, 0.3, 0.4, 0.0],  # image 2: rank 1
        [0.2, 0.9, 0.6, 0.5],  # image 3: 0.9, 0.6 beat 0.5 -> rank 3
    ]
    # Columns (text queries): text 0 rank 1; text 1 (0.2 vs 0.3, 0.9) rank 3;
    # text 2 (0.4 vs 0.5, 0.7, 0.6) rank 4; text 3 (0.5 vs 0.6) rank 2.
    metrics = retrieval_metrics(*_from_scores(scores))
    assert metrics["i2t_r1"] == 0.5
    assert metrics["i2t_r5"] == 1.0
    assert metrics["i2t_mean_rank"] == pytest.approx((1 + 4 + 1 + 3) / 4)
    assert metrics["i2t_median_rank"] == 2.0
    assert metrics["t2i_r1"] == 0.25
    assert metrics["t2i_mean_rank"] == pytest.approx((1 + 3 + 4 + 2) / 4)
    assert metrics["t2i_median_rank"] == 2.5


def test_random_case_matches_argsort_ranks():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(40, 8)).astype(np.float32)
    text = (image + rng.normal(size=(40, 8)) * 1.5).astype(np.float32)
    scores = image.astype(np.float64) @ text.T.astype(np.float64)
    i2t = np.array([np.argsort(-scores[i]).tolist().index(i) + 1 for i in range(40)])
    t2i = np.array([np.argsort(-scores[:, j]).tolist().index(j) + 1 for j in range(40)])
    metrics = retrieval_metrics(image, text)
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        assert metrics[f"{name}_mean_rank"] == pytest.approx(ranks.mean())
        assert metrics[f"{name}_median_rank"] == pytest.approx(np.median(ranks))
        for k in (1, 5, 10):
            assert metrics[f"{name}_r{k}"] == pytest.approx(np.mean(ranks <= k))
    assert 0 < metrics["i2t_r1"] < metrics["i2t_r5"] < metrics["i2t_r10"] < 1


def test_collapsed_embeddings_score_chance_not_perfect():
    # Every score ties. Counting only strictly better items would report R@1 = 1 here.
    n = 20
    constant = np.ones((n, 4), np.float32)
    metrics = retrieval_metrics(constant, constant)
    for name in ("i2t", "t2i"):
        assert metrics[f"{name}_r1"] == pytest.approx(1 / n)
        assert metrics[f"{name}_r5"] == pytest.approx(5 / n)
        assert metrics[f"{name}_r10"] == pytest.approx(10 / n)
        assert metrics[f"{name}_mean_rank"] == pytest.approx((n + 1) / 2)


def test_ties_equal_average_over_all_tie_breaking_orders():
    scores = [
        [0.5, 0.5, 0.2, 0.5, 0.1, 0.5],
        [0.3, 0.3, 0.3, 0.9, 0.3, 0.3],
        [0.7, 0.7, 0.7, 0.7, 0.7, 0.7],
        [0.4, 0.8, 0.4, 0.4, 0.0, 0.8],
        [0.6, 0.6, 0.6, 0.2, 0.6, 0.1],
        [0.1, 0.2, 0.2, 0.2, 0.2, 0.2],
    ]
    captions = ["a", "b", "a", "b", "c", "a"]
    metrics = retrieval_metrics(*_from_scores(scores), captions=captions)
    for name, matrix in (("i2t", np.array(scores)), ("t2i", np.array(scores).T)):
        ranks, hits, same_hits = _brute_force(matrix, captions, k_values=(1, 5))
        assert metrics[f"{name}_mean_rank"] == pytest.approx(ranks.mean())
        assert metrics[f"{name}_median_rank"] == pytest.approx(np.median(ranks))
        for k in (1, 5):
            assert metrics[f"{name}_r{k}"] == pytest.approx(hits[k].mean())
            assert metrics[f"{name}_r{k}_samecap"] == pytest.approx(same_hits[k].mean())
        assert metrics[f"{name}_r10"] == 1.0 and metrics[f"{name}_r10_samecap"] == 1.0


def test_samecap_counts_duplicate_captions_as_hits():
    captions = ["red", "red", "blue", "blue", "green"]
    caption_id = {"red": 0, "blue": 1, "green": 2}
    # Identical captions give identical text embeddings; images of one caption differ slightly,
    # the later index scoring a little higher.
    text = np.zeros((5, 3), np.float32)
    image = np.zeros((5, 3), np.float32)
    for i, caption in enumerate(captions):
        text[i, caption_id[caption]] = 1.0
        image[i, caption_id[caption]] = 1.0 + 0.01 * i
    metrics = retrieval_metrics(image, text, captions=captions)
    # i2t: the two texts of a duplicated caption tie exactly -> R@1 1/2 for those four images.
    assert metrics["i2t_r1"] == pytest.approx((4 * 0.5 + 1) / 5)
    assert metrics["i2t_mean_rank"] == pytest.approx((4 * 1.5 + 1) / 5)
    # t2i: of two identical text queries only the one whose image scores higher gets rank 1.
    assert metrics["t2i_r1"] == pytest.approx(3 / 5)
    assert metrics["t2i_mean_rank"] == pytest.approx((2 + 1 + 2 + 1 + 1) / 5)
    for name in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert metrics[f"{name}_r{k}_samecap"] == 1.0


def test_last_bit_differences_still_tie():
    # The same caption embedded at two batch positions (or on another mesh) differs in its last
    # bits; ranks must not depend on that noise.
    captions = ["red", "red", "blue", "blue", "green"]
    caption_id = {"red": 0, "blue": 1, "green": 2}
    text = np.zeros((5, 4), np.float32)
    image = np.zeros((5, 4), np.float32)
    for i, caption in enumerate(captions):
        text[i, caption_id[caption]] = 1.0
        image[i, caption_id[caption]] = 1.0 + 0.01 * i
    # Column 3 is where a real difference between the two "red" texts would show: image 0
    # would then prefer text 0 and image 1 text 1.
    image[0, 3], image[1, 3] = -1.0, 1.0
    exact = retrieval_metrics(image, text, captions=captions)
    assert exact["i2t_r1"] == pytest.approx((4 * 0.5 + 1) / 5)
    rng = np.random.default_rng(0)
    for _ in range(5):
        noisy = text * (1.0 + rng.uniform(-1e-6, 1e-6, size=(5, 1))).astype(np.float32)
        assert retrieval_metrics(image, noisy, captions=captions) == pytest.approx(exact)
    # A real difference (1e-3 of the score) is an order, not a tie: both red images now
    # rank their own text first.
    text[1, 3] = 1e-3
    ordered = retrieval_metrics(image, text, captions=captions)
    assert ordered["i2t_r1"] == pytest.approx((2 * 1.0 + 2 * 0.5 + 1) / 5)


def test_chunking_does_not_change_results():
    rng = np.random.default_rng(1)
    # Coarse quantisation makes plenty of exact ties, so tie handling is exercised across chunks.
    image = np.round(rng.normal(size=(53, 6)) * 2) / 2
    text = np.round((image + rng.normal(size=(53, 6))) * 2) / 2
    captions = [f"c{i}" for i in rng.integers(0, 20, size=53)]
    whole = retrieval_metrics(image, text, captions, chunk_size=10_000)
    for chunk_size in (1, 7, 52, 53):
        assert retrieval_metrics(image, text, captions, chunk_size=chunk_size) == whole


def test_retrieval_rejects_bad_input():
    with pytest.raises(ValueError, match="same \\[N, D\\] shape"):
        retrieval_metrics(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="NaN or inf"):
        retrieval_metrics(np.array([[np.nan, 0.0], [0.0, 1.0]]), np.eye(2))
    with pytest.raises(ValueError, match="2 captions for 3"):
        retrieval_metrics(np.eye(3), np.eye(3), captions=["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        retrieval_metrics(np.ones((0, 2)), np.ones((0, 2)))


def test_bleu_of_identical_corpora_is_one():
    corpus = [
        "a small red circle at the top left",
        "a large blue square in the middle of the image",
    ]
    metrics = caption_metrics(corpus, list(corpus))
    assert metrics == {"caption_bleu4": pytest.approx(1.0), "caption_exact": 1.0}


def test_bleu_matches_sacrebleu_and_hand_computation():
    prediction, reference = "the cat sat on the mat", "the cat is on the mat"
    metrics = caption_metrics([prediction], [reference])
    assert metrics["caption_bleu4"] == pytest.approx(
        sacrebleu.corpus_bleu([prediction], [[reference]]).score / 100
    )
    # n-gram precisions 5/6, 3/5, 1/4 and 0/3, which sacrebleu's default 'exp' smoothing turns into
    # 1/(2*3); equal lengths so no brevity penalty.
    assert metrics["caption_bleu4"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25)
    assert metrics["caption_exact"] == 0.0


def test_exact_match_ignores_case_and_whitespace():
    predictions = ["A  red Circle ", "a blue square", "a green star"]
    references = ["a red circle", "a blue  square", "a green triangle"]
    assert caption_metrics(predictions, references)["caption_exact"] == pytest.approx(2 / 3)


def test_caption_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="2 predicted captions for 1 references"):
        caption_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        caption_metrics([], [])

"""mmjax.evals.metrics.coco_captions matches pycocoevalcap's BLEU, CIDEr-D and ROUGE-L and fails clearly."""

import math
import random
import time

import pytest

from mmjax.evals.metrics.coco_captions import caption_scores, caption_scores_tokenized, tokenize

# (candidate, references): repeated words, candidates longer and shorter than their references,
# one sharing no n-gram, single words, shared phrases across images (so document frequency > 1).
CASES = [
    (
        "a man riding a wave on top of a surfboard",
        [
            "a man riding a wave on a surfboard",
            "a surfer rides a large wave in the ocean",
            "a person on a surfboard riding a wave",
        ],
    ),
    ("a cat sitting on a couch", ["a cat is sitting on the couch", "a grey cat lying on a sofa"]),
    ("dog", ["a dog running in the grass", "a brown dog plays outside"]),
    ("the the the the the", ["the cat sat on the mat"]),
    (
        "a red bus",
        [
            "a red double decker bus driving down a city street",
            "a bus on the road",
            "a big red bus",
            "a red bus parked by the curb",
            "the bus is red and white",
        ],
    ),
    ("purple elephants juggling violins", ["two people playing tennis on a court"]),
    (
        "a plate of food with broccoli and rice and broccoli and rice",
        ["a plate of rice and broccoli", "broccoli and rice on a white plate"],
    ),
    ("a man", ["a man riding a wave on a surfboard", "a man"]),
    (
        "a group of people standing around a kitchen",
        [
            "people standing in a kitchen",
            "a group of people in a kitchen preparing food",
            "several people stand around a kitchen island",
            "a kitchen with people",
        ],
    ),
    ("a clock on a tower", ["a large clock tower in a city", "a clock on the side of a tower"]),
    (
        "a giraffe standing next to a tree",
        [
            "a giraffe standing next to a tree",
            "a tall giraffe by a tree",
            "a giraffe eats leaves from a tree",
        ],
    ),
    ("two dogs two dogs two dogs", ["two dogs playing with a frisbee", "two dogs in a park"]),
    ("a pizza", ["a pizza with pepperoni and cheese on a table"]),
    (
        "a train traveling down the tracks next to a platform at a station",
        ["a train on the tracks", "a train at the station"],
    ),
    (
        "a woman holding an umbrella in the rain",
        [
            "a woman with an umbrella walking in the rain",
            "a person holding an umbrella",
            "a lady walks in the rain under an umbrella",
        ],
    ),
    ("surfboard", ["surfboard"]),
    (
        "a bowl of fruit",
        [
            "a bowl filled with oranges and bananas",
            "fruit in a bowl",
            "a bowl of fruit on a table",
            "oranges and apples in a wooden bowl",
            "a bowl full of fruit",
        ],
    ),
    (
        "a bathroom with a toilet and a sink",
        [
            "a bathroom with a toilet and a sink",
            "a white toilet next to a sink",
            "a small bathroom",
        ],
    ),
    ("zebra zebra", ["a zebra standing in a field", "two zebras in the grass"]),
    ("a man riding a wave on a surfboard", ["a man riding a wave on a surfboard"]),
    (
        "an airplane flying in the sky",
        ["a plane flying through a blue sky", "an airplane in the sky", "a jet flies overhead"],
    ),
    (
        "a laptop computer sitting on top of a desk",
        [
            "a laptop on a desk",
            "a desk with a laptop and a mouse",
            "a computer on a wooden desk next to a lamp",
        ],
    ),
    ("a cat", ["a dog running in the grass"]),
    (
        "a person on a skateboard doing a trick",
        [
            "a skateboarder doing a trick",
            "a person on a skateboard in the air",
            "a young man doing a skateboard trick",
        ],
    ),
    ("a street sign on a pole", ["a street sign", "a sign on a pole at an intersection"]),
    ("a horse", ["a horse", "a brown horse", "a horse in a field", "a horse eating grass"]),
    (
        "a table with plates of food and glasses of wine on it",
        ["a dinner table set with food and wine", "plates of food on a table"],
    ),
    (
        "a baseball player swinging a bat at a ball",
        [
            "a baseball player swinging a bat",
            "a batter swings at a pitch",
            "a baseball game in progress",
            "a player at home plate",
        ],
    ),
    ("a teddy bear", ["a teddy bear sitting on a bed", "a stuffed bear on a pillow"]),
    (
        "kites",
        [
            "people flying kites on a beach",
            "kites in the sky over the sand",
            "a beach with many kites",
        ],
    ),
]


def _pycoco_scores(predictions, references):
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(p)] for i, p in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    return {**{f"bleu{k + 1}": bleu[k] for k in range(4)}, "cider": cider, "rouge_l": rouge}


def _assert_close(got, want):
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6, rel=0), key


def test_parity_with_pycocoevalcap_on_fixed_cases():
    predictions = [c.split() for c, _ in CASES]
    references = [[r.split() for r in refs] for _, refs in CASES]
    want = _pycoco_scores(predictions, references)
    assert 0 < want["bleu4"] < want["bleu1"] < 1 and want["cider"] > 0  # A non-trivial set.
    _assert_close(caption_scores_tokenized(predictions, references), want)
    # Through the string API: these captions hold no punctuation, so tokenize is split().
    _assert_close(caption_scores([c for c, _ in CASES], [refs for _, refs in CASES]), want)


def test_parity_with_pycocoevalcap_on_random_small_vocabulary():
    # Few distinct words: many repeats and partial matches, which stresses clipping and the LCS.
    rng = random.Random(0)
    words = [f"w{i}" for i in range(6)]
    for _ in range(10):
        n = rng.randint(1, 8)
        predictions = [rng.choices(words, k=rng.randint(1, 10)) for _ in range(n)]
        references = [
            [rng.choices(words, k=rng.randint(1, 10)) for _ in range(rng.randint(1, 5))]
            for _ in range(n)
        ]
        _assert_close(
            caption_scores_tokenized(predictions, references),
            _pycoco_scores(predictions, references),
        )


def test_perfect_match_scores_one_and_cider_ten():
    refs = [["a man riding a wave"], ["two dogs in a park"], ["a red bus on the street"]]
    scores = caption_scores([r[0] for r in refs], refs)
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"):
        assert scores[key] == pytest.approx(1.0, abs=1e-9), key
    # Every image's n-grams are rare in the set (idf > 0) and match exactly: cosine 1, x10.
    assert scores["cider"] == pytest.approx(10.0, abs=1e-9)


def test_cider_is_zero_when_every_image_has_the_same_references():
    # Document frequency = number of images for every reference n-gram: idf 0, nothing counts.
    refs = [["a cat on a mat", "the cat sleeps"]] * 3
    scores = caption_scores(["a cat on a mat"] * 3, refs)
    assert scores["cider"] == pytest.approx(0.0, abs=1e-12)
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-9)


def test_bleu_clips_repeated_words_and_picks_the_shorter_closest_reference():
    scores = caption_scores(["the the the the"], [["the cat"]])
    assert scores["bleu1"] == pytest.approx(1 / 4, abs=1e-9)  # "the" counts once: 1 of 4.
    # Candidate of 2 words, references of 1 and 3 words: a tie, the shorter one wins, so there is
    # no brevity penalty (the longer would give exp(1 - 3/2)).
    scores = caption_scores(["cat mat"], [["cat", "cat on mat"]])
    assert scores["bleu1"] == pytest.approx(1.0, abs=1e-9)
    # Shorter than its only reference: brevity penalty exp(1 - 6/2).
    scores = caption_scores(["the cat"], [["the cat sat on the mat"]])
    assert scores["bleu1"] == pytest.approx(math.exp(-2), abs=1e-9)


def test_rouge_l_by_hand():
    # LCS "a c d" = 3: precision 3/4, recall 3/5.
    p, r = 3 / 4, 3 / 5
    scores = caption_scores(["a b c d"], [["a x c d y"]])
    assert scores["rouge_l"] == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p), abs=1e-12)
    # Best precision and best recall are taken over references separately (as pycocoevalcap).
    scores = caption_scores(["a b"], [["a b c d e f", "a"]])
    assert scores["rouge_l"] == pytest.approx(1.0, abs=1e-12)
    # No shared word: 0 for every metric.
    scores = caption_scores(["purple elephants"], [["two people playing tennis"]])
    assert scores["rouge_l"] == 0.0 and scores["bleu1"] < 1e-9 and scores["cider"] == 0.0


def test_empty_prediction_scores_zero():
    scores = caption_scores(["", "a dog runs"], [["a cat sits"], ["a dog runs"]])
    assert scores["rouge_l"] == pytest.approx(0.5)
    assert set(scores) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l"}


def test_tokenize():
    assert tokenize("A Man's dog, isn't (running) on 3.5 black-and-white \"tiles\"...") == [
        "a", "man", "'s", "dog", "is", "n't", "running", "on", "3.5", "black-and-white", "tiles"
    ]  # fmt: skip
    assert tokenize("Fish & chips: $5!") == ["fish", "&", "chips", "$", "5"]
    assert tokenize(" ... ") == []


def test_scales_to_5000_images():
    rng = random.Random(1)
    words = [f"w{i}" for i in range(2000)]
    references = [[rng.choices(words, k=rng.randint(5, 15)) for _ in range(5)] for _ in range(5000)]
    predictions = [refs[0] for refs in references]
    start = time.perf_counter()
    scores = caption_scores_tokenized(predictions, references)
    assert time.perf_counter() - start < 10  # About 0.5 s on one core.
    # Each prediction is one of its references: the closest length, every n-gram found.
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-9)
    assert scores["rouge_l"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    "predictions, references, message",
    [
        (["a"], [["a"], ["b"]], "1 predictions but 2 reference lists"),
        ([], [], "no predictions"),
        (["a", "b"], [["a"], []], "image 1 has no references"),
        ([3], [["a"]], r"predictions\[0\] must be a str, got int"),
        (["a"], [["a", None]], r"references\[0\]\[1\] must be a str, got NoneType"),
        (["a"], ["a cat"], r"references\[0\] must be a list of captions, got str"),
    ],
)
def test_errors(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        caption_scores(predictions, references)


def test_tokenized_errors():
    with pytest.raises(ValueError, match=r"predictions\[0\] must be a list of str tokens"):
        caption_scores_tokenized(["a cat"], [[["a", "cat"]]])
    with pytest.raises(ValueError, match=r"references\[0\]\[0\] holds a non-str token of type int"):
        caption_scores_tokenized([["a"]], [[["a", 1]]])

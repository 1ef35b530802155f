"""SentencePiece tokenizer: training, caching, id layout, truncation, round trips."""

import numpy as np
import pytest

from mmjax.data.shapes import ShapesSource, all_captions
from mmjax.text.sentencepiece import Tokenizer, load_or_train_tokenizer, train_tokenizer

VOCAB_SIZE = 128


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(
        all_captions(), tmp_path_factory.mktemp("tok") / "tokenizer.model", VOCAB_SIZE
    )


def test_special_ids_and_vocab_size(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    assert 30 < tokenizer.vocab_size <= VOCAB_SIZE


def test_dataset_captions_round_trip(tokenizer):
    captions = [ShapesSource("eval")[i]["caption"] for i in range(200)]
    ids = tokenizer.encode_batch(captions, context_length=32)
    assert ids.dtype == np.int32 and ids.shape == (200, 32)
    assert tokenizer.decode_batch(ids) == captions
    assert [tokenizer.decode(row) for row in ids] == captions


def test_row_layout_is_bos_pieces_eos_then_padding(tokenizer):
    ids = tokenizer.encode_batch(
        ["a small red circle at the top left", "a large cyan cross in the center"], 24
    )
    for row in ids:
        eos_at = int(np.flatnonzero(row == tokenizer.eos_id)[0])
        assert row[0] == tokenizer.bos_id
        pieces = row[1:eos_at]
        assert len(pieces) > 0
        assert not np.isin(pieces, [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id]).any()
        assert (row[eos_at + 1 :] == tokenizer.pad_id).all()


def test_whole_words_become_single_pieces(tokenizer):
    # The corpus has few distinct words, so BPE learns each as one piece:
    # BOS + 8 words + EOS.
    row = tokenizer.encode_batch(["a small red circle at the top left"], 16)[0]
    assert np.count_nonzero(row) == 10


def test_long_caption_is_truncated_and_still_ends_with_eos(tokenizer):
    caption = "a large purple triangle at the bottom right"
    full = tokenizer.encode_batch([caption], 32)[0]
    num_pieces = int(np.flatnonzero(full == tokenizer.eos_id)[0]) - 1
    context_length = num_pieces  # two short of room for BOS and EOS
    cut = tokenizer.encode_batch([caption], context_length)[0]
    assert cut.shape == (context_length,)
    assert cut[0] == tokenizer.bos_id and cut[-1] == tokenizer.eos_id
    np.testing.assert_array_equal(cut[1:-1], full[1 : context_length - 1])
    assert caption.startswith(tokenizer.decode(cut))
    # The tightest fit keeps BOS and EOS and no pieces.
    np.testing.assert_array_equal(
        tokenizer.encode_batch([caption], 2), [[tokenizer.bos_id, tokenizer.eos_id]]
    )


def test_decode_stops_at_first_eos_and_skips_bos_and_pad(tokenizer):
    first, second = tokenizer.encode_batch(["a small red circle", "a large blue square"], 10)
    first_pieces = first[1 : np.flatnonzero(first == tokenizer.eos_id)[0]]
    second_pieces = second[1 : np.flatnonzero(second == tokenizer.eos_id)[0]]
    ids = [
        tokenizer.pad_id,
        tokenizer.bos_id,
        *first_pieces,
        tokenizer.eos_id,
        *second_pieces,
        tokenizer.eos_id,
    ]
    assert tokenizer.decode(ids) == "a small red circle"
    assert tokenizer.decode(np.array([tokenizer.eos_id, *first_pieces])) == ""


def test_decode_tolerates_ids_beyond_the_vocabulary(tokenizer):
    # A model with a padded embedding table can sample such ids.
    pieces = tokenizer.encode_batch(["a small red circle"], 10)[0][1:3]
    text = tokenizer.decode([*pieces, tokenizer.vocab_size + 5])
    assert text.startswith(tokenizer.decode(pieces))
    assert "\u2047" in text  # sentencepiece's unknown marker


def test_unseen_characters_map_to_unknown(tokenizer):
    row = tokenizer.encode_batch(["a small ZEBRA"], 16)[0]
    assert 1 in row  # unk id


def test_training_is_deterministic_and_leaves_no_temporary_files(tmp_path):
    captions = [ShapesSource()[i]["caption"] for i in range(300)]
    train_tokenizer(captions, tmp_path / "a" / "tokenizer.model", 64)
    train_tokenizer(iter(captions), tmp_path / "b" / "tokenizer.model", 64)
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (
        tmp_path / "b" / "tokenizer.model"
    ).read_bytes()
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["tokenizer.model"]


def test_training_is_quiet(tmp_path, capfd):
    train_tokenizer(all_captions(), tmp_path / "tokenizer.model", 64)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_small_corpus_gives_smaller_vocabulary_instead_of_failing(tmp_path):
    tokenizer = train_tokenizer(
        ["a red circle", "a blue square"], tmp_path / "tokenizer.model", 1000
    )
    assert tokenizer.vocab_size < 1000
    assert tokenizer.decode(tokenizer.encode_batch(["a blue circle"], 16)[0]) == "a blue circle"


def test_load_or_train_trains_once_then_loads(tmp_path):
    path = tmp_path / "workdir" / "tokenizer.model"
    calls = []

    def captions():
        calls.append(1)
        return all_captions()

    trained = load_or_train_tokenizer(path, captions, VOCAB_SIZE)
    cached = load_or_train_tokenizer(path, captions, VOCAB_SIZE)
    assert len(calls) == 1
    assert cached.vocab_size == trained.vocab_size
    caption = ["a small red circle at the top left"]
    np.testing.assert_array_equal(
        cached.encode_batch(caption, 16), trained.encode_batch(caption, 16)
    )


def test_bad_input_is_rejected_with_the_culprit_named(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match=r"missing\.model"):
        Tokenizer.load(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="no captions"):
        train_tokenizer([], tmp_path / "tokenizer.model", 64)
    with pytest.raises(TypeError, match="captions must be str"):
        train_tokenizer(["a red circle", 7], tmp_path / "tokenizer.model", 64)
    with pytest.raises(ValueError, match="vocab_size=5"):
        train_tokenizer(all_captions(), tmp_path / "tokenizer.model", 5)
    with pytest.raises(ValueError, match="context_length"):
        tokenizer.encode_batch(["a red circle"], 1)
    with pytest.raises(TypeError, match="single str"):
        tokenizer.encode_batch("a red circle", 8)
    assert not (tmp_path / "tokenizer.model").exists()


def test_cli_says_why_the_vocabulary_is_smaller_and_names_an_empty_source(tmp_path, capsys):
    from mmjax.tools.tokenizer import main

    out = tmp_path / "tok.model"
    assert main(["train", "shapes", "--vocab-size", "256", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    size = Tokenizer.load(out).vocab_size
    assert size < 256
    assert printed.startswith(f"wrote {out}: vocabulary {size} (below --vocab-size 256, an upper ")
    assert "these captions hold no more distinct pieces" in printed
    blank = tmp_path / "blank.csv"
    blank.write_text("filepath,caption\na.jpg,   \nb.jpg,\n")
    assert main(["train", f"csv:{blank}", "--vocab-size", "64", "--out", str(out)]) == 2
    err = capsys.readouterr().err  # After the progress bar:
    assert err.endswith(f"\nerror: csv:{blank}: no usable caption among its 2 samples\n")

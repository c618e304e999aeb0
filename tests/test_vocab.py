"""Tokenization and the vocabulary: the coco.pt special ids, encoding to 17 ids, decoding at <END>."""

import pytest

from captool.vocab import MAX_WORDS, SPECIALS, Vocab, tokenize


def test_tokenize_lowercases_strips_punctuation_and_caps_length():
    assert tokenize("A Red circle, and a BLUE square!") == ["a", "red", "circle", "and", "a", "blue", "square"]
    assert len(tokenize(" ".join(["word"] * 40))) == MAX_WORDS


def test_build_keeps_the_specials_at_coco_pt_ids_and_honours_min_count():
    v = Vocab.build(["a red circle", "a red square", "a blue star"], min_count=2)
    assert v.idx_to_token[:4] == list(SPECIALS)
    assert (v.null_id, v.start_id, v.end_id, v.unk_id) == (0, 1, 2, 3)
    assert v.idx_to_token[4:] == ["a", "red"]  # most frequent first; circle/square/blue/star seen once


def test_encode_pads_to_17_and_unknown_words_become_unk():
    v = Vocab(list(SPECIALS) + ["a", "red", "circle"])
    ids = v.encode("a red triangle")
    assert len(ids) == MAX_WORDS + 2
    assert ids[:5] == [v.start_id, 4, 5, v.unk_id, v.end_id] and set(ids[5:]) == {v.null_id}


def test_decode_stops_at_end_and_skips_null_and_start():
    v = Vocab(list(SPECIALS) + ["a", "red", "circle"])
    row = [1, 4, 0, 5, 6, 2, 4, 4]
    assert v.word_ids(row) == [4, 5, 6]
    assert v.decode(row) == "a red circle"


def test_a_vocabulary_without_the_specials_first_is_refused():
    with pytest.raises(ValueError, match="must start with"):
        Vocab(["a", "<NULL>", "<START>", "<END>", "<UNK>"])
    with pytest.raises(ValueError, match="duplicate"):
        Vocab(list(SPECIALS) + ["a", "a"])

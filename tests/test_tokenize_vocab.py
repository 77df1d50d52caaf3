import numpy as np
import pytest
import torch

from captions.errors import CaptionsError
from captions.pipeline.tokenize import get_tokenizer, simple_tokenize
from captions.pipeline.vocab import (
    END_ID,
    NULL_ID,
    SPECIALS,
    START_ID,
    UNK_ID,
    Vocabulary,
    caption_words,
    decode_captions,
)


def test_simple_tokenizer_keeps_vietnamese_words_and_drops_punctuation():
    text = "Một người đàn ông đang đứng trên đá, của đỉnh núi!"
    assert simple_tokenize(text) == ["một", "người", "đàn", "ông", "đang", "đứng", "trên", "đá", "của", "đỉnh", "núi"]


def test_simple_tokenizer_normalises_decomposed_accents():
    import unicodedata

    decomposed = unicodedata.normalize("NFD", "Người đang chơi")
    assert simple_tokenize(decomposed) == ["người", "đang", "chơi"]


def test_simple_tokenizer_english():
    assert simple_tokenize("A dog's toy, lying on the GRASS.") == ["a", "dog's", "toy", "lying", "on", "the", "grass"]


@pytest.mark.parametrize("name", ["nltk", "spacy"])
def test_library_tokenizers_work_offline(name):
    tok = get_tokenizer(name)
    assert tok("Two dogs play in the snow.") == ["two", "dogs", "play", "in", "the", "snow"]


def test_unknown_tokenizer_lists_choices():
    with pytest.raises(CaptionsError, match="unknown tokenizer 'sentencepiece'.*simple, nltk, spacy, wordpiece, bpe, "
                                            "hf:PATH"):
        get_tokenizer("sentencepiece")


@pytest.mark.parametrize("name", ["wordpiece", "bpe"])
def test_subword_tokenizers_split_the_simple_tokenizers_words(name):
    assert get_tokenizer(name) is simple_tokenize  # the pieces come from the vocabulary (test_subword.py)


def test_vocabulary_specials_min_count_and_order():
    vocab = Vocabulary.build([["a", "dog"], ["a", "cat"], ["a", "dog"]], min_count=2)
    assert vocab.idx_to_token[:4] == list(SPECIALS)
    assert vocab.idx_to_token[4:] == ["a", "dog"]  # cat seen once: dropped; most frequent first
    assert vocab.token_to_idx["dog"] == 5


def test_encode_clamps_pads_and_maps_unknown_words():
    vocab = Vocabulary.build([["a", "red", "circle"]], min_count=1)
    ids = vocab.encode(["a", "blue", "circle", "on", "top"], max_length=3)
    assert ids.tolist() == [START_ID, vocab.token_to_idx["a"], UNK_ID, vocab.token_to_idx["circle"], END_ID]
    short = vocab.encode(["a"], max_length=3)
    assert short.tolist() == [START_ID, vocab.token_to_idx["a"], END_ID, NULL_ID, NULL_ID]


def test_decode_captions_roundtrip_tensor_and_array():
    vocab = Vocabulary.build([["a", "red", "circle"]], min_count=1)
    batch = np.stack([vocab.encode(["a", "red", "circle"], 5), vocab.encode(["red"], 5)])
    assert decode_captions(torch.from_numpy(batch), vocab) == ["a red circle", "red"]
    assert decode_captions(batch[0], vocab) == "a red circle"
    # stops at <END> even when tokens follow
    assert decode_captions([START_ID, 4, END_ID, 5], vocab) == vocab.idx_to_token[4]


def test_caption_words_agrees_with_decode_captions_and_gives_each_word_its_step():
    vocab = Vocabulary.build([["a", "red", "circle", "on", "top"]], min_count=1)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(vocab), size=(200, 9))  # specials anywhere, <END> or not
    decoded = decode_captions(rows, vocab)
    for row, text in zip(rows.tolist(), decoded, strict=True):
        words, steps = caption_words(row, vocab.idx_to_token)
        assert " ".join(words) == text
        assert [vocab.idx_to_token[row[t]] for t in steps] == words
        if steps:
            assert END_ID not in row[: steps[-1] + 1]
    a, r = vocab.token_to_idx["a"], vocab.token_to_idx["red"]
    assert caption_words([START_ID, a, NULL_ID, r, END_ID, a], vocab.idx_to_token) == (["a", "red"], [1, 3])


def test_vocabulary_hash_changes_with_tokens(tmp_path):
    v1 = Vocabulary.build([["a", "b"]], 1)
    v2 = Vocabulary.build([["a", "c"]], 1)
    assert v1.hash != v2.hash
    v1.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json").hash == v1.hash

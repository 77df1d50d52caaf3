"""Subword vocabularies (``--tokenizer wordpiece|bpe|hf:PATH``): round trips in Vietnamese and
English, unseen words spelled with pieces, an existing tokenizer.json loaded as it is, and a
whole prepare -> extract -> train -> evaluate / caption run whose outputs never show a ``##``."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from captions.errors import CaptionsError
from captions.pipeline.prepared import load_prepared
from captions.pipeline.settings import PrepareOptions
from captions.pipeline.subword import load_hf, train_subword
from captions.pipeline.tokenize import simple_tokenize
from captions.pipeline.vocab import (
    END,
    END_ID,
    SPECIALS,
    START_ID,
    UNK_ID,
    Vocabulary,
    caption_word_pieces,
    decode_captions,
    join_pieces,
)
from tests.conftest import cli

VIETNAMESE = [
    "Một người đàn ông đang đứng trên đỉnh núi.",
    "Cầu thủ bóng chày đang cầm gậy thi đấu trên sân.",
    "Hai đứa trẻ đang chơi bóng đá trên bãi cỏ xanh.",
    "Người phụ nữ đang đánh quả bóng tennis vào tường gạch.",
    "Một vận động viên trượt tuyết đang lao xuống dốc.",
]
ENGLISH = [
    "A baseball player is holding a bat on the field.",
    "Two children are playing football on the green grass.",
    "There is a small tennis court with some buildings beside it.",
    "Many cars are parked in the parking lot near the road.",
    "A man on skis is going down a snowy mountain.",
]


def trained(kind: str, captions: list[str], vocab_size: int = 120) -> Vocabulary:
    return train_subword(kind, [simple_tokenize(c) for c in captions * 3], vocab_size).vocabulary()


def round_trip(vocab: Vocabulary, caption: str, max_length: int = 60) -> str:
    return decode_captions(vocab.encode(simple_tokenize(caption), max_length), vocab)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
@pytest.mark.parametrize("captions", [VIETNAMESE, ENGLISH], ids=["vietnamese", "english"])
def test_caption_to_ids_to_caption_gives_the_normalised_caption(kind, captions):
    vocab = trained(kind, captions)
    assert vocab.idx_to_token[:4] == list(SPECIALS)
    for c in captions:
        # decomposed accents and capitals come back as the word pipeline writes them: NFC, lowercase
        for text in (c, unicodedata.normalize("NFD", c.upper())):
            assert round_trip(vocab, text) == " ".join(simple_tokenize(c))
    pieces = [t for t in vocab.idx_to_token if t.startswith("##")]
    assert pieces, "a vocabulary of 120 pieces must split some words"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=sorted(set("".join(simple_tokenize(" ".join(VIETNAMESE))))), min_size=1,
                        max_size=12), min_size=1, max_size=10))
def test_any_words_in_the_training_alphabet_round_trip(words):
    vocab = VI_WORDPIECE
    ids = vocab.encode(words, 200)
    assert UNK_ID not in ids.tolist()
    assert decode_captions(ids, vocab) == " ".join(words)


VI_WORDPIECE = trained("wordpiece", VIETNAMESE)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_an_unseen_word_is_spelled_with_pieces_not_unk(kind):
    vocab = trained(kind, ENGLISH)
    words = vocab.encode(["the", "skateboarders"], 20)
    body = words[1 : list(words).index(2)].tolist()
    assert UNK_ID not in body and len(body) > 2  # "skateboarders" is in no caption: several pieces
    assert decode_captions(words, vocab) == "the skateboarders"
    word_vocab = Vocabulary.build([simple_tokenize(c) for c in ENGLISH], min_count=1)
    assert word_vocab.encode(["skateboarders"], 5).tolist()[1] == UNK_ID  # what words alone would give


def test_max_length_counts_pieces_and_cuts_at_a_word_boundary():
    vocab = trained("wordpiece", ENGLISH, vocab_size=100)
    words = simple_tokenize("the skateboarders hold a bat")
    pieces = [int((vocab.encode([w], 50) > END_ID).sum()) for w in words]
    assert pieces[1] > 2
    limit = pieces[0] + pieces[1] + 1  # room for the first two words and one piece of the third
    ids = vocab.encode(words, limit).tolist()
    assert len(ids) == limit + 2 and ids[0] == START_ID
    assert decode_captions(ids, vocab) == "the skateboarders"  # not a piece of "hold"
    cut = decode_captions(vocab.encode(["skateboarders"], 2), vocab)  # a first word too long is cut itself
    assert "skateboarders".startswith(cut) and cut != "skateboarders"


def test_decoding_joins_pieces_and_gives_each_word_its_steps():
    itos = [*SPECIALS, "ten", "##nis", "court", "##s", "a"]
    row = [START_ID, 8, 4, 5, 6, 7, 2, 4]
    words, steps = caption_word_pieces(row, itos)
    assert words == ["a", "tennis", "courts"] and steps == [[1], [2, 3], [4, 5]]
    assert decode_captions(row, itos) == "a tennis courts"
    assert join_pieces(["ten", "##nis", END]) == ["tennis", END]  # the self-critical reward's words
    assert join_pieces(["ten", "<UNK>", "##nis"]) == ["ten", "<UNK>"]  # a word with an unknown piece is unknown
    assert join_pieces(["##nis", "", "##court"]) == ["nis", "court"]  # SentencePiece's bare word mark


def test_the_self_critical_reward_scores_joined_words():
    import torch

    from captions.cider import CiderD
    from captions.models.checkpoint import build_decoder
    from captions.trainer.scst import self_critical_loss

    torch.manual_seed(0)
    itos = [*SPECIALS, "ten", "##nis", "court"]
    cider = CiderD({0: [["tennis"]], 1: [["court"]]})  # "tennis" is no token: only joined pieces can match it
    model = build_decoder("attn", vocab_size=len(itos), feature_dim=6, embed_dim=8, hidden_dim=16)
    _, reward = self_critical_loss(model, torch.randn(1, 3, 6), np.array([0]), cider, itos, k=200, max_length=4)
    assert reward > 0


def test_the_tokenizer_is_part_of_the_vocabulary_hash_and_checked_on_load(tmp_path):
    a = train_subword("wordpiece", [simple_tokenize(c) for c in ENGLISH], 120)
    b = train_subword("bpe", [simple_tokenize(c) for c in ENGLISH], 120)
    assert a.vocabulary().hash != Vocabulary(a.idx_to_token).hash  # same tokens, but a tokenizer too
    assert a.vocabulary().hash != b.vocabulary().hash
    a.save(tmp_path)
    a.vocabulary().save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded.hash == a.vocabulary().hash and loaded.is_subword
    with pytest.raises(CaptionsError, match="decodes but does not encode"):
        loaded.encode(["a"], 5)
    (tmp_path / "tokenizer.json").write_text((tmp_path / "tokenizer.json").read_text().replace('"a"', '"a "'))
    with pytest.raises(CaptionsError, match="tokenizer.json: the tokenizer does not match the sha256"):
        Vocabulary.load(tmp_path / "vocab.json")


# ----------------------------------------------------------------------------------- hf:PATH
def bert_like(path, drop: str | None = None):
    """A BERT-style tokenizer.json, made here: [PAD] 0, [unused*] 1-3, [UNK] [CLS] [SEP] [MASK]
    after them, BERT's normaliser, pre-tokenizer and [CLS] ... [SEP] template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokens = ["[PAD]", "[unused0]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
              "a", "dog", "cat", "on", "the", "grass", "run", "##s", "##ning", "play", "##ing", "d", "##o", "##g"]
    tokens = [t for t in tokens if t != drop]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    if drop != "[CLS]":
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 5), ("[SEP]", 6)])
    tok.add_special_tokens([t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in tokens])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def csv_dataset(root):
    from tests.conftest import write_image

    rows = ["image,caption,split"]
    captions = ["A dog runs on the grass", "The cat is playing", "a dog on the grass", "Dogs running"]
    for i, c in enumerate(captions * 2):
        write_image(root / "images" / f"{i}.jpg", seed=i)
        rows.append(f"{i}.jpg,{c},{'train' if i < 6 else 'val'}")
    (root / "captions.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root / "captions.csv"


def test_a_tokenizer_json_made_here_loads_as_it_is(tmp_path):
    path = bert_like(tmp_path / "bert" / "tokenizer.json")
    source = csv_dataset(tmp_path / "src")
    r = cli("prepare", "csv", source, "--out", tmp_path / "out", "--tokenizer", f"hf:{path}", "--workers", 1,
            "--image-size", 32, "--quiet")
    assert r.exit_code == 0, r.output
    ds = load_prepared(tmp_path / "out")
    itos = ds.vocab.idx_to_token
    original = json.loads(path.read_text())["model"]["vocab"]
    assert itos[:4] == list(SPECIALS) and len(itos) == len(original)
    # the special tokens swapped into 0-3; every other token keeps the tokenizer's own id
    assert sorted(itos[4:7]) == ["[unused0]", "[unused1]", "[unused2]"] and itos[7] == "[MASK]"
    assert all(itos[i] == t for t, i in original.items() if i >= 8)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == path.read_bytes()
    assert ds.manifest["vocab_hash"] == ds.vocab.hash and ds.vocab.tokenizer["kind"] == "hf"
    texts = decode_captions(ds.captions, ds.vocab)
    assert texts[0] == "a dog runs on the grass" and texts[3] == "dogs running"
    assert not any("[CLS]" in t or "##" in t for t in texts)  # no template tokens, no pieces marks

    manifest = tmp_path / "out" / "manifest.json"
    written = manifest.stat().st_mtime_ns
    r = cli("prepare", "csv", source, "--out", tmp_path / "out", "--tokenizer", f"hf:{path}", "--workers", 1,
            "--image-size", 32, "--quiet")
    assert r.exit_code == 0 and manifest.stat().st_mtime_ns == written  # nothing to do
    bert_like(path, drop="[MASK]")  # another file under the same name prepares again
    r = cli("prepare", "csv", source, "--out", tmp_path / "out", "--tokenizer", f"hf:{path}", "--workers", 1,
            "--image-size", 32, "--quiet")
    assert r.exit_code == 0 and manifest.stat().st_mtime_ns != written
    assert load_prepared(tmp_path / "out").vocab.hash != ds.vocab.hash


def test_subword_datasets_are_scored_against_the_same_words_as_word_datasets(tmp_path):
    source = csv_dataset(tmp_path / "src")
    for name in ("simple", "wordpiece"):
        r = cli("prepare", "csv", source, "--out", tmp_path / name, "--tokenizer", name, "--min-count", 1,
                "--workers", 1, "--image-size", 32, "--quiet")
        assert r.exit_code == 0, r.output
    words, pieces = load_prepared(tmp_path / "simple"), load_prepared(tmp_path / "wordpiece")
    assert pieces.references("val") == words.references("val") == {6: ["a dog on the grass"], 7: ["dogs running"]}
    assert decode_captions(pieces.captions, pieces.vocab) == decode_captions(words.captions, words.vocab)
    assert pieces.manifest["options"]["max_length"] == 20 and words.manifest["options"]["max_length"] == 16


def test_a_tokenizer_without_a_start_token_is_refused_in_one_line(tmp_path):
    path = bert_like(tmp_path / "tokenizer.json", drop="[CLS]")
    r = cli("prepare", "csv", csv_dataset(tmp_path / "src"), "--out", tmp_path / "out", "--tokenizer", f"hf:{path}")
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0 and "no token for <START> (e.g. [CLS] or <s>)" in r.output
    assert str(path) in r.output and not (tmp_path / "out").exists()  # refused before any work


def test_sentencepiece_style_tokenizers_load_and_byte_level_ones_are_refused(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = [simple_tokenize(c) for c in VIETNAMESE * 3]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator((" ".join(w) for w in words), trainers.UnigramTrainer(
        vocab_size=90, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], unk_token="<unk>", show_progress=False))
    tok.save(str(tmp_path / "sp.json"))
    model = load_hf(tmp_path / "sp.json")
    vocab = model.vocabulary()
    assert vocab.idx_to_token[:4] == list(SPECIALS) and not any(t.startswith("▁") for t in vocab.idx_to_token)
    for c in VIETNAMESE:
        assert round_trip(vocab, c) == " ".join(simple_tokenize(c))

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["a dog"], trainers.BpeTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                           show_progress=False))
    tok.save(str(tmp_path / "gpt.json"))
    with pytest.raises(CaptionsError, match="gpt.json: byte-level tokenizers .* are not supported"):
        load_hf(tmp_path / "gpt.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CaptionsError, match="bad.json: not a Hugging Face tokenizer.json"):
        load_hf(tmp_path / "bad.json")


def test_max_length_defaults_to_words_or_pieces():
    assert PrepareOptions().max_length == 16 and PrepareOptions(tokenizer="wordpiece").max_length == 20
    assert PrepareOptions(tokenizer="bpe", max_length=30).max_length == 30
    assert "vocab_size" not in PrepareOptions().identity()  # word datasets keep their fingerprint


# ---------------------------------------------------------------------------------- end to end
SIZE = 64


@pytest.fixture(scope="module")
def wordpiece_run(tmp_path_factory):
    """prepare (wordpiece, 100 pieces: the synthetic words split) -> extract -> train attn, with a
    self-critical epoch, through the command line."""
    root = tmp_path_factory.mktemp("wp")
    data, feats, run = root / "data", root / "feats.h5", root / "run"
    r = cli("prepare", "synthetic", "--out", data, "--num-images", "24,8,8", "--image-size", SIZE,
            "--tokenizer", "wordpiece", "--vocab-size", 100, "--workers", 1, "--quiet")
    assert r.exit_code == 0, r.output
    r = cli("extract-features", data, "--out", feats, "--backbone", "resnet18", "--weights", "none", "--image-size",
            SIZE, "--dtype", "float32", "--workers", 0, "--batch-size", 16, "--quiet")
    assert r.exit_code == 0, r.output
    r = cli("train", "attn", "--data", data, "--features", feats, "--out", run, "--device", "cpu", "--epochs", 2,
            "--scst-epochs", 1, "--batch-size", 32, "--embed-dim", 16, "--hidden-dim", 32, "--lr", 1e-2, "--quiet")
    assert r.exit_code == 0, r.output
    return {"root": root, "data": data, "feats": feats, "ckpt": run / "best.pt", "train": r.output}


def test_wordpiece_pipeline_writes_words_everywhere(wordpiece_run, tmp_path, no_java):
    from captions.captioner import Captioner
    from captions.models.checkpoint import load_checkpoint, save_checkpoint

    run = wordpiece_run
    ds = load_prepared(run["data"])
    assert any(t.startswith("##") for t in ds.vocab.idx_to_token)
    out = tmp_path / "eval"
    r = cli("evaluate", run["ckpt"], "--data", run["data"], "--features", run["feats"], "--split", "test",
            "--beam-size", 1, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == 8 and all(p["caption"] and "##" not in p["caption"] for p in preds)

    # not vacuous: a decoder made to emit one continuation piece at every step is evaluated too, and
    # its captions are that piece joined into one word (a trained model's pieces depend on rounding)
    piece = next(t for t in ds.vocab.idx_to_token if t.startswith("##") and t[2:].isalpha())
    ckpt = load_checkpoint(run["ckpt"])
    ckpt["state_dict"]["out.bias"][ds.vocab.idx_to_token.index(piece)] += 1e4
    save_checkpoint(tmp_path / "pieces.pt", ckpt)
    r = cli("evaluate", tmp_path / "pieces.pt", "--data", run["data"], "--features", run["feats"], "--split",
            "test", "--beam-size", 1, "--out", tmp_path / "eval-pieces")
    assert r.exit_code == 0, r.output
    preds = json.loads((tmp_path / "eval-pieces" / "predictions.json").read_text())
    assert all(p["caption"] and p["caption"].replace(piece[2:], "") == "" for p in preds), preds

    captioner = Captioner.from_checkpoint(run["ckpt"], device="cpu")
    paths = [ds.image_path(int(i)) for i in ds.split_image_ids("test")[:3]]
    for res in captioner.caption(paths, beam_size=2):
        assert res.error is None and res.words and not any("##" in w for w in res.words)
        assert res.caption == " ".join(res.words)
        assert res.attention.shape == (len(res.words), 2, 2)  # one map per word: the mean of its pieces' maps
        np.testing.assert_allclose(res.attention.sum(axis=(1, 2)), 1.0, rtol=1e-4)
    r = cli("caption", *paths, "--checkpoint", run["ckpt"], "--device", "cpu", "--json")
    assert r.exit_code == 0 and "##" not in r.stdout

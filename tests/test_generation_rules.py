"""What any decoding strategy may generate (issue 17): at least ``min_length`` words, never
``<NULL>`` or ``<START>``, ``<UNK>`` only when allowed; wide beams no longer find the empty caption."""

from __future__ import annotations

import pytest
import torch

from captions.generation import Greedy, Rules, beam_search, decode, generate, greedy_decode, sample_captions
from captions.models import DECODERS
from captions.pipeline.vocab import END_ID, NULL_ID, START_ID, UNK_ID
from tests.test_decoding import make_feats, make_model


def words_before_end(tokens: torch.Tensor) -> list[list[int]]:
    """Each row's tokens before its first <END> (all of them when there is none)."""
    rows = []
    for row in tokens.tolist():
        rows.append(row[: row.index(END_ID)] if END_ID in row else row)
    return rows


def eager_model(kind: str, vocab: int = 12, **biases: float):
    """A random decoder pushed towards special tokens: bias per token id name (end, null, start, unk)."""
    model = make_model(kind, vocab=vocab)
    ids = {"end": END_ID, "null": NULL_ID, "start": START_ID, "unk": UNK_ID}
    with torch.no_grad():
        for name, value in biases.items():
            model.out.bias[ids[name]] += value
    return model


@pytest.mark.parametrize("kind", tuple(DECODERS))
def test_every_strategy_obeys_the_rules(kind):
    model = eager_model(kind, end=8.0, null=20.0, start=20.0, unk=20.0)
    feats = make_feats(kind, 5)
    rules = Rules(min_length=3, allow_unk=False)
    with torch.no_grad():
        outputs = [greedy_decode(model, feats, 8, rules)[0]]
        outputs += [beam_search(model, feats, 8, beam_size=k, rules=rules)[0] for k in (2, 12)]
    tokens, logps = sample_captions(model, feats, 3, 8, rules)
    outputs.append(tokens)
    for out in outputs:
        for words in words_before_end(out):
            assert len(words) >= 3
            assert not {NULL_ID, START_ID, UNK_ID} & set(words), words
    assert logps.requires_grad and torch.isfinite(logps).all()  # the sampled words are never masked ones
    with torch.no_grad():  # the rules are what prevents them: this model prefers the specials
        free = greedy_decode(model, feats, 8, Rules(min_length=0))[0]
    assert set(free[:, 0].tolist()) <= {END_ID, UNK_ID}  # <NULL> and <START> stay banned under any rules


def test_wide_beams_never_return_the_empty_caption():
    """The issue's case: an LSTM over 36 tokens whose <END> right after <START> outscores every
    caption (as label smoothing leaves it): with the default rules no beam width returns an empty
    caption; without them the wide beams do."""
    model = eager_model("lstm", vocab=36, end=4.0)
    feats = make_feats("lstm", 20)
    with torch.no_grad():
        for k in (1, 3, 24, 30, 36):
            tokens = decode(model, feats, 10, beam_size=k)[0]
            assert all(len(w) >= 1 for w in words_before_end(tokens)), k
        unruled = decode(model, feats, 10, beam_size=36, rules=Rules(min_length=0))[0]
    assert sum(len(w) == 0 for w in words_before_end(unruled)) > 0


def test_unk_only_when_allowed():
    model, feats = eager_model("lstm", unk=6.0), make_feats("lstm", 6)
    with torch.no_grad():
        allowed = greedy_decode(model, feats, 6)[0]
        banned = beam_search(model, feats, 6, beam_size=4, rules=Rules(allow_unk=False))[0]
    assert any(UNK_ID in w for w in words_before_end(allowed))
    assert not any(UNK_ID in w for w in words_before_end(banned))


@pytest.mark.parametrize("kind", tuple(DECODERS))
def test_beam_results_with_rules_do_not_depend_on_batch_size(kind):
    model, feats = make_model(kind), make_feats(kind, 6)
    rules = Rules(min_length=2, allow_unk=False)
    with torch.no_grad():
        whole = beam_search(model, feats, 9, beam_size=3, rules=rules)
        single = [beam_search(model, feats[i : i + 1], 9, beam_size=3, rules=rules) for i in range(6)]
    assert torch.equal(whole[0], torch.cat([s[0] for s in single]))
    torch.testing.assert_close(whole[1], torch.cat([s[1] for s in single]), rtol=1e-5, atol=1e-5)


def test_a_vocabulary_without_words_can_still_end():
    model = make_model("rnn", vocab=4)  # <NULL> <START> <END> <UNK> only
    feats = make_feats("rnn", 2)
    assert Rules(allow_unk=False).banned(0, 4) == [NULL_ID, START_ID, UNK_ID]  # <END> stays: nothing else could
    with torch.no_grad():
        out = generate(model, feats, 5, Greedy(), Rules(allow_unk=False))
    assert out.tokens[:, 0].tolist() == [END_ID, END_ID]

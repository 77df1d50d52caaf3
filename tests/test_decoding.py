"""Greedy and beam search: beam 1 == greedy, batch-size invariance, no <END>, exactness on a tiny model."""

from __future__ import annotations

import itertools

import pytest
import torch

from captions.generation import Rules, beam_search, decode, greedy_decode
from captions.models import DECODERS
from captions.models.checkpoint import build_decoder
from captions.pipeline.vocab import END_ID, NULL_ID, START_ID

MODELS = tuple(DECODERS)


# the <END> bias that makes a random decoder of each kind finish some captions early (a random
# Transformer's words depend less on the image, so it needs a larger one)
END_BIAS = {"transformer": 3.0}


def make_model(kind: str, vocab: int = 12, channels: int = 8, seed: int = 0, end_bias: float | None = None):
    """A small random decoder with peaked output distributions; ``end_bias`` makes <END> likely enough
    that some captions finish early and some do not."""
    end_bias = END_BIAS.get(kind, 1.5) if end_bias is None else end_bias
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, feature_dim=channels, embed_dim=8, hidden_dim=16, dropout=0.0,
               d_model=16, heads=4, ffn_dim=32, layers=2)
    model = build_decoder(kind, **cfg).eval()
    with torch.no_grad():
        model.out.weight.mul_(4.0)
        model.out.bias[END_ID] += end_bias
    return model


def make_feats(kind: str, n: int, channels: int = 8, positions: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, positions, channels) if DECODERS[kind].uses_spatial else (n, channels)
    return torch.randn(*shape, generator=g)


def caption_length(tokens: torch.Tensor) -> list[int]:
    """Words + <END> per row (max_length when there is no <END>)."""
    out = []
    for row in tokens.tolist():
        out.append(row.index(END_ID) + 1 if END_ID in row else len(row))
    return out


@pytest.mark.parametrize("kind", MODELS)
def test_beam_size_one_is_greedy(kind):
    model, feats = make_model(kind), make_feats(kind, 16)
    g_tok, g_score, g_maps = greedy_decode(model, feats, 10)
    b_tok, b_score, b_maps = beam_search(model, feats, 10, beam_size=1)
    lengths = caption_length(g_tok)
    assert min(lengths) < 10  # the test covers captions that finish ...
    assert torch.equal(g_tok, b_tok)
    assert torch.equal(g_score, b_score)
    if DECODERS[kind].uses_spatial:
        assert b_maps is not None and g_maps is not None and b_maps.shape == g_maps.shape
        for i, n_steps in enumerate(lengths):  # maps agree on every generated word and <END>
            assert torch.equal(g_maps[i, :n_steps], b_maps[i, :n_steps])
    else:
        assert b_maps is None and g_maps is None
    # decode() dispatches, and a length penalty changes nothing with one hypothesis
    assert torch.equal(decode(model, feats, 10, beam_size=1, length_penalty=0.7)[0], g_tok)
    assert torch.equal(beam_search(model, feats, 10, beam_size=1, length_penalty=0.7)[0], g_tok)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("beam_size", [1, 3])
def test_results_do_not_depend_on_batch_size(kind, beam_size):
    model, feats = make_model(kind), make_feats(kind, 6)
    results = []
    for bs in (1, 2, 6):
        parts = [beam_search(model, feats[i : i + bs], 12, beam_size=beam_size, length_penalty=0.5)
                 for i in range(0, 6, bs)]
        tokens = torch.cat([p[0] for p in parts])
        scores = torch.cat([p[1] for p in parts])
        maps = None
        if DECODERS[kind].uses_spatial:  # steps run differ with the batch; compare per word
            maps = [p[2][j] for p in parts for j in range(p[2].shape[0])]
        results.append((tokens, scores, maps))
    ref_tok, ref_scores, ref_maps = results[0]
    for tok, scores, maps in results[1:]:
        assert torch.equal(tok, ref_tok)
        torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
        if DECODERS[kind].uses_spatial:
            for i, n_steps in enumerate(caption_length(ref_tok)):
                torch.testing.assert_close(maps[i][:n_steps], ref_maps[i][:n_steps], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", MODELS)
def test_never_ending_model_falls_back_to_best_unfinished(kind):
    model, feats = make_model(kind), make_feats(kind, 5)
    with torch.no_grad():
        model.out.bias[END_ID] = -1e9
    for beam_size in (1, 3):
        tokens, scores, maps = decode(model, feats, 7, beam_size=beam_size, length_penalty=1.0)
        assert tokens.shape == (5, 7)
        assert not (tokens == END_ID).any() and not (tokens == NULL_ID).any()  # max-length captions
        assert torch.isfinite(scores).all()
        if DECODERS[kind].uses_spatial:
            assert maps is not None and maps.shape == (5, 7, 4)


def exhaustive_best(model, feats: torch.Tensor, max_length: int, length_penalty: float, rules: Rules = Rules()):
    """Score every token sequence of a tiny vocabulary by teacher-forced steps; best finished one per
    image among those ``rules`` allow (at least ``min_length`` words; no <NULL>, <START>, maybe <UNK>)."""
    vocab = model.cfg.vocab_size
    best = []
    for i in range(feats.shape[0]):
        f = feats[i : i + 1]
        top = (float("-inf"), None, None)
        for length in range(rules.min_length + 1, max_length + 1):
            for words in itertools.product(range(vocab), repeat=length - 1):
                if any(w == END_ID or w in rules.banned(t, vocab) for t, w in enumerate(words)):
                    continue
                seq = [*words, END_ID]
                state, tok, total = model.init_state(f), torch.tensor([START_ID]), 0.0
                for w in seq:
                    logits, state, _ = model.step(tok, state)
                    total += float(torch.log_softmax(logits.float(), -1)[0, w])
                    tok = torch.tensor([w])
                norm = total / length**length_penalty if length_penalty else total
                if norm > top[0]:
                    top = (norm, seq, total)
        best.append(top)
    return best


@pytest.mark.parametrize("rules", [Rules(), Rules(min_length=2, allow_unk=False)])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_finds_the_exact_optimum(length_penalty, rules):
    """With a beam as wide as the whole hypothesis space, beam search is exhaustive search (over
    the captions the rules allow: here, without them, image 0's optimum is the empty caption)."""
    model = make_model("lstm", vocab=5, end_bias=0.0, seed=3)
    feats = make_feats("lstm", 3, seed=4)
    with torch.no_grad():
        tokens, scores, _ = beam_search(model, feats, 3, beam_size=5**3, length_penalty=length_penalty, rules=rules)
        expected = exhaustive_best(model, feats, 3, length_penalty, rules)
    for i, (_, seq, total) in enumerate(expected):
        assert tokens[i].tolist()[: len(seq)] == seq
        assert abs(float(scores[i]) - total) < 1e-4


def test_beam_search_beats_or_matches_greedy_on_average():
    model, feats = make_model("attn", end_bias=0.5), make_feats("attn", 32)
    _, g_scores, _ = greedy_decode(model, feats, 10)
    tokens, b_scores, maps = beam_search(model, feats, 10, beam_size=4)
    assert float(b_scores.mean()) >= float(g_scores.mean())
    assert maps is not None and maps.shape[:2] == (32, maps.shape[1]) and maps.shape[2] == 4
    # attention weights are distributions on every generated word, zero after <END>
    for i, n_steps in enumerate(caption_length(tokens)):
        torch.testing.assert_close(maps[i, :n_steps].sum(-1), torch.ones(n_steps))
        assert float(maps[i, n_steps:].abs().sum()) == 0.0


def test_bad_beam_size():
    model, feats = make_model("rnn"), make_feats("rnn", 2)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, feats, 5, beam_size=0)

"""The Transformer decoder: its key/value cache changes nothing but speed, its teacher-forced pass
equals its steps, and it captions new images with attention maps over the feature grid."""

from __future__ import annotations

import pytest
import torch

from captions.generation import Beam, Greedy, Sample, beam_search, generate, greedy_decode
from captions.models.checkpoint import build_decoder
from captions.pipeline.vocab import END_ID

PLAIN = {"encoder_layers": 0, "global_feature": False}  # no encoder, no whole-image input (defaults: 1, on)


def tiny(seed: int = 0, **settings):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=14, feature_dim=6, d_model=16, heads=4, ffn_dim=32, layers=2, dropout=0.0, **settings)
    model = build_decoder("transformer", **cfg).eval()
    with torch.no_grad():  # peaked distributions, and <END> likely enough that lengths vary
        if not model.cfg.tie_embeddings:  # tied, it would scale the word inputs too
            model.out.weight.mul_(3.0)
        for _ in range(12):
            if len(set(lengths(greedy_decode(model, feats(8), 16)[0]))) > 2:
                break
            model.out.bias[END_ID] += 0.5
    return model


def lengths(tokens: torch.Tensor) -> list[int]:
    return [row.index(END_ID) if END_ID in row else len(row) for row in tokens.tolist()]


def feats(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 5, 6, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("settings", [{}, PLAIN, {**PLAIN, "encoder_layers": 1, "positions": "learned",
                                                "tie_embeddings": True}, {**PLAIN, "global_feature": True}])
def test_the_cache_gives_the_same_greedy_and_beam_results(settings):
    model, f = tiny(**settings), feats(8)
    cached = greedy_decode(model, f, 16), beam_search(model, f, 16, beam_size=3)
    model.use_kv_cache = False
    uncached = greedy_decode(model, f, 16), beam_search(model, f, 16, beam_size=3)
    assert len(set(lengths(cached[0][0]))) > 2  # captions of several lengths covered
    for (tok_a, score_a, maps_a), (tok_b, score_b, maps_b) in zip(cached, uncached, strict=True):
        assert torch.equal(tok_a, tok_b)
        # the same sums of the same log-probabilities, up to float rounding of the prefix's products
        torch.testing.assert_close(score_a, score_b, rtol=0, atol=1e-5)
        torch.testing.assert_close(maps_a, maps_b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("settings", [{}, PLAIN])
def test_beam_results_do_not_depend_on_the_batch(settings):
    model, f = tiny(**settings), feats(6)
    whole = beam_search(model, f, 12, beam_size=4)
    for i in range(6):
        one = beam_search(model, f[i : i + 1], 12, beam_size=4)
        assert torch.equal(one[0][0], whole[0][i])
        torch.testing.assert_close(one[1][0], whole[1][i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("settings", [{}, {**PLAIN, "encoder_layers": 1}, {**PLAIN, "global_feature": True}])
def test_teacher_forcing_equals_the_steps_and_groups_captions_by_image(settings):
    model, f = tiny(**settings), feats(3)
    tokens = torch.randint(4, 14, (5, 7))
    index = torch.tensor([2, 0, 2, 1, 0])
    grouped, alphas = model(f, tokens, image_index=index)
    assert alphas is None
    torch.testing.assert_close(grouped, model(f[index], tokens)[0], rtol=1e-5, atol=1e-5)
    state = model.init_state(f[index])
    for t in range(7):
        logits, state, alpha = model.step(tokens[:, t], state)
        torch.testing.assert_close(logits, grouped[:, t], rtol=1e-4, atol=1e-5)
        assert alpha.shape == (5, 5)
        torch.testing.assert_close(alpha.sum(-1), torch.ones(5))


def test_sampling_keeps_one_memory_per_image():
    model, f = tiny(global_feature=True), feats(3)
    state = model.expand_state(model.init_state(f), 4)
    assert state["mk0"].shape[0] == 3 and state["global"].shape[0] == 3 and state["k0"].shape[0] == 12
    torch.manual_seed(0)
    out = generate(model, f, 10, Sample(4))
    assert out.tokens.shape[0] == 12 and out.token_logp.requires_grad


def test_strategies_share_the_step_loop():
    model, f = tiny(), feats(4)
    with torch.no_grad():
        g = generate(model, f, 10, Greedy())
        b = generate(model, f, 10, Beam(1))
    assert torch.equal(g.tokens, b.tokens[:, : g.tokens.shape[1]])


def test_d_model_must_split_into_heads(tmp_path):
    from click.testing import CliRunner

    from captions.cli import main

    with pytest.raises(ValueError, match="--heads 4 does not divide --d-model 30"):
        build_decoder("transformer", vocab_size=9, feature_dim=6, d_model=30, heads=4)
    # refused with the other settings, before any data is read
    result = CliRunner().invoke(main, ["train", "transformer", "--data", str(tmp_path), "--features",
                                       str(tmp_path / "f.h5"), "--out", str(tmp_path / "run"), "--heads", "3"])
    assert result.exit_code == 1 and result.output == "Error: --heads 3 does not divide --d-model 256\n"

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from captions.errors import CaptionsError
from captions.features.extract import ExtractOptions, extract_features
from captions.models import DECODERS
from captions.models.attention import doubly_stochastic_penalty
from captions.models.base import caption_loss
from captions.models.checkpoint import build_decoder, load_checkpoint
from captions.pipeline.prepare import PrepareOptions, prepare_synthetic
from captions.pipeline.prepared import load_prepared
from captions.pipeline.vocab import NULL_ID
from captions.trainer.data import FeatureStore, epoch_batches, images_of_batch
from captions.trainer.train import TrainConfig, TrainingInterrupted, train


def config(**settings) -> TrainConfig:
    """A TrainConfig from training and decoder settings alike."""
    return TrainConfig.from_dict(settings)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(epochs=2, batch_size=16, embed_dim=16, hidden_dim=32, attention_dim=16, lr=3e-3, dropout=0.1,
            checkpoint_every=0, eval_batch_size=64, scst_epochs=0,
            d_model=32, layers=2, heads=4, ffn_dim=64, warmup_steps=4)


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model,extra", [(name, {}) for name in DECODERS]
                         + [("lstm", {"feature_as_input": True}), ("attn", {"attention": "additive"})])
def test_every_decoder_learns_and_writes_its_run(tmp_path, synth, model, extra):
    data, cache = synth
    result = train(data, cache, tmp_path / "run", config(model=model, **{**TINY, "epochs": 3}, **extra),
                   progress=False)
    rows = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert {"BLEU-4", "CIDEr", "captions_per_s"} <= set(rows[0])
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["model"] == model and best["epoch"] == result["best"]["epoch"]
    assert best["vocab"]["hash"] == load_prepared(data).vocab.hash
    assert best["features"]["backbone"] == "resnet18"


@pytest.mark.parametrize("model", ["attn", "transformer"])
def test_bf16_training_follows_fp32(tmp_path, synth, model):
    """--precision bf16 (the CPU default where the CPU has native bf16) learns as fp32 does."""
    data, cache = synth
    losses = {}
    for precision in ("fp32", "bf16"):
        train(data, cache, tmp_path / precision, config(model=model, precision=precision, **TINY),
              progress=False)
        losses[precision] = [r["val_loss"] for r in read_metrics(tmp_path / precision)]
        assert load_checkpoint(tmp_path / precision / "last.pt")["train_config"]["precision"] == precision
    assert losses["bf16"][-1] < losses["bf16"][0]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
    assert losses["bf16"] != losses["fp32"]  # it did run in another precision
    with pytest.raises(CaptionsError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        train(data, cache, tmp_path / "x", config(model="attn", precision="fp16", **TINY), progress=False)


def test_ema_weights_are_evaluated_shipped_and_resumed(tmp_path, synth):
    data, cache = synth
    cfg = config(model="attn", **{**TINY, "epochs": 2}, ema=0.9)
    train(data, cache, tmp_path / "whole", cfg, progress=False)
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    assert whole["ema_n_averaged"] > 1
    raw, avg = whole["train_state_dict"], whole["state_dict"]
    assert any(not torch.equal(raw[k], avg[k]) for k in raw)  # the shipped weights are the average
    steps = []
    with pytest.raises(TrainingInterrupted):
        train(data, cache, tmp_path / "cut", cfg, progress=False,
              step_callback=lambda s: steps.append(s) or (s == 3 and os.kill(os.getpid(), signal.SIGINT)))
    train(data, cache, tmp_path / "cut", cfg, resume=True, progress=False)
    cut = load_checkpoint(tmp_path / "cut" / "last.pt")
    for k in avg:
        torch.testing.assert_close(cut["state_dict"][k], avg[k])
        torch.testing.assert_close(cut["train_state_dict"][k], raw[k])


def test_early_stop_is_final_and_resume_leaves_it(tmp_path, synth):
    data, cache = synth
    cfg = config(model="lstm", **{**TINY, "epochs": 6, "lr": 0.0}, patience=1)  # lr 0: CIDEr never improves
    result = train(data, cache, tmp_path / "run", cfg, progress=False)
    assert result["epochs_run"] == 2 and result["best"]["epoch"] == 1
    assert "stopped_before" not in result
    again = train(data, cache, tmp_path / "run", cfg, resume=True, progress=False)
    assert again["epochs_run"] == 2 and len(read_metrics(tmp_path / "run")) == 2 and again["stopped_before"]


@pytest.mark.parametrize("start", ["cider", "loss"])
def test_a_dataset_without_val_split_trains_through_self_critical_epochs(tmp_path, start):
    """No val split: nothing to choose the self-critical start by; training goes on from the last
    cross-entropy epoch instead of failing when self-critical training starts."""
    prepare_synthetic(tmp_path / "prep", 24, 0, 4, workers=1, progress=False,
                      options=PrepareOptions(min_count=1, image_size=64))
    cache = extract_features(tmp_path / "prep", tmp_path / "f.h5",
                             ExtractOptions(backbone="resnet18", weights="none", image_size=64, workers=0),
                             progress=False)
    cfg = config(model="lstm", **{**TINY, "epochs": 1, "scst_epochs": 1}, scst_start=start)
    result = train(tmp_path / "prep", cache, tmp_path / "run", cfg, progress=False)
    assert result["epochs_run"] == 2
    assert [r["phase"] for r in read_metrics(tmp_path / "run")] == ["cross-entropy", "self-critical"]


@pytest.mark.parametrize("start", ["cider", "loss"])
def test_self_critical_training_starts_from_the_chosen_cross_entropy_epoch(tmp_path, synth, start):
    """--scst-start cider: from best.pt (best val CIDEr); loss: from scst_start.pt, the epoch of the
    lowest cross-entropy val loss."""
    data, cache = synth
    # scst_lr 1e-12: after the self-critical epoch the weights are still those it started from
    cfg = config(model="lstm", **{**TINY, "epochs": 4, "scst_epochs": 1}, scst_lr=1e-12, scst_start=start)
    run = tmp_path / start
    train(data, cache, run, cfg, progress=False)
    rows = read_metrics(run)[:4]
    source = load_checkpoint(run / ("best.pt" if start == "cider" else "scst_start.pt"))
    if start == "loss":
        assert source["lowest_val_loss"][0] == min(rows, key=lambda r: r["val_loss"])["epoch"]
    else:
        assert not (run / "scst_start.pt").exists()
    after = load_checkpoint(run / "last.pt")["state_dict"]
    assert all(torch.allclose(after[k], source["state_dict"][k], atol=1e-6) for k in after)


def test_loss_ignores_null_and_has_both_reductions():
    logits = torch.zeros(2, 3, 5)
    targets = torch.tensor([[4, 2, NULL_ID], [4, NULL_ID, NULL_ID]])
    per_token = np.log(5)
    assert caption_loss(logits, targets, "sum").item() == pytest.approx(3 * per_token / 2)
    assert caption_loss(logits, targets, "mean").item() == pytest.approx(per_token)


def test_dot_attention_weights_are_a_distribution_and_penalty_vanishes_when_covered():
    torch.manual_seed(0)
    model = build_decoder("attn", vocab_size=9, feature_dim=6, embed_dim=4, hidden_dim=8)
    logits, alphas = model(torch.randn(3, 5, 6), torch.randint(1, 9, (3, 4)))
    assert logits.shape == (3, 4, 9) and alphas.shape == (3, 4, 5)
    torch.testing.assert_close(alphas.sum(-1), torch.ones(3, 4))
    uniform = torch.full((1, 5, 5), 0.2)  # 5 steps x 5 positions: each position gets total weight 1
    assert doubly_stochastic_penalty(uniform, torch.ones(1, 5, dtype=torch.long)).item() == pytest.approx(0.0)


def test_teacher_forcing_matches_step_by_step():
    torch.manual_seed(0)
    for name, feats in (("lstm", torch.randn(2, 6)), ("attn", torch.randn(2, 4, 6))):
        model = build_decoder(name, vocab_size=9, feature_dim=6, embed_dim=4, hidden_dim=8).eval()
        tokens = torch.randint(3, 9, (2, 5))  # no <END>: the teacher-forced pass stops there
        full, _ = model(feats, tokens)
        state = model.init_state(feats)
        for t in range(5):
            step_logits, state, _ = model.step(tokens[:, t], state)
            torch.testing.assert_close(step_logits, full[:, t], rtol=1e-4, atol=1e-5)


def test_captions_of_an_image_share_its_projected_features():
    """Training passes each image once with the image of each caption: same result as one row per
    caption, including images with fewer captions than others (padding slots)."""
    torch.manual_seed(0)
    for attention in ("dot", "additive"):
        model = build_decoder("attn", vocab_size=9, feature_dim=6, embed_dim=4, hidden_dim=8,
                              attention=attention).eval()
        feats = torch.randn(3, 4, 6)
        for image_index in (torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([1, 0, 2, 1, 1, 0])):
            tokens = torch.randint(1, 9, (6, 5))
            logits, alphas = model(feats, tokens, image_index=image_index)
            per_caption, per_alphas = model(feats[image_index], tokens)
            torch.testing.assert_close(logits, per_caption, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(alphas, per_alphas, rtol=1e-4, atol=1e-5)
    lstm = build_decoder("lstm", vocab_size=9, feature_dim=6, embed_dim=4, hidden_dim=8).eval()
    pooled, tokens, index = torch.randn(2, 6), torch.randint(1, 9, (3, 5)), torch.tensor([1, 0, 1])
    torch.testing.assert_close(lstm(pooled, tokens, image_index=index)[0], lstm(pooled[index], tokens)[0])


def test_word_gate_table_matches_the_per_token_product():
    """On small vocabularies attn looks W_x x_t + b up per word: same values and same gradients as
    projecting every token."""
    torch.manual_seed(0)
    model = build_decoder("attn", vocab_size=7, feature_dim=6, embed_dim=4, hidden_dim=8).train()
    tokens = torch.randint(1, 7, (4, 5))  # 20 tokens, 7 words: looked up
    weight = torch.randn(4, 5, 32)
    params, results = (model.embed.weight, model.W_x.weight, model.W_x.bias), []
    for gates in (model.input_gates, lambda t: model.W_x(model.embed(t))):
        model.zero_grad()
        out = gates(tokens)
        (out * weight).sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in params])
    for looked_up, projected in zip(*results, strict=True):
        torch.testing.assert_close(looked_up, projected)


def test_dropout_drops_its_share_and_keeps_the_mean():
    torch.manual_seed(0)
    drop = build_decoder("rnn", vocab_size=7, feature_dim=6, dropout=0.3).drop.train()
    y = drop(torch.ones(200, 500))
    assert (y == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert y.mean().item() == pytest.approx(1.0, abs=0.02)
    assert torch.equal(drop.eval()(torch.ones(3, 4)), torch.ones(3, 4))


def test_batches_hold_whole_images():
    rows = np.arange(40)
    img = np.repeat(np.arange(12), [5, 4, 3, 5, 2, 5, 1, 5, 3, 2, 4, 1])
    batches = epoch_batches(rows, img, 8, seed=0, epoch=0)
    assert sorted(np.concatenate(batches).tolist()) == rows.tolist()
    assert all(len(b) <= 8 for b in batches)
    seen = [set(img[b].tolist()) for b in batches]
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])  # an image is never split
    images, index = images_of_batch(np.array([7, 3, 7, 9, 3]))
    assert images.tolist() == [7, 3, 9] and index.tolist() == [0, 1, 0, 2, 1]


def test_features_are_stored_once_per_image(synth):
    data, cache_path = synth
    from captions.features.cache import FeatureCache

    ds = load_prepared(data)
    with FeatureCache(cache_path) as cache:
        store = FeatureStore(cache, spatial=True, ram_budget=2**30, device=torch.device("cpu"))
        assert store.in_ram and store.array.shape[0] == len(ds.images) < len(ds.captions)
        streamed = FeatureStore(cache, spatial=True, ram_budget=1, device=torch.device("cpu"))
        assert not streamed.in_ram
        rows = ds.split_caption_rows("train")
        for batch in epoch_batches(rows, ds.image_ids, 8, 0, 0, streamed.block_images)[:5]:
            ids = ds.image_ids[batch]
            torch.testing.assert_close(streamed.gather(ids), store.gather(ids))


def test_streaming_reads_each_block_once_per_epoch(synth):
    data, cache_path = synth
    from captions.features.cache import FeatureCache

    ds = load_prepared(data)
    with FeatureCache(cache_path) as cache:
        store = FeatureStore(cache, spatial=True, ram_budget=1, device=torch.device("cpu"))
        store.block_images = 8  # several blocks in this tiny cache
        reads = []
        read = store._read_block
        store._read_block = lambda b: reads.append(b) or read(b)
        rows = ds.split_caption_rows("train")
        batches = epoch_batches(rows, ds.image_ids, 4, 0, 0, store.block_images)
        for k, batch in enumerate(batches):  # as the training loop walks an epoch
            if k + 1 < len(batches):
                store.prefetch(int(ds.image_ids[batches[k + 1][0]]) // store.block_images)
            store.gather(ds.image_ids[batch])
        blocks = {int(ds.image_ids[b[0]]) // 8 for b in batches}
        assert sorted(reads) == sorted(blocks)


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    rows = np.arange(100)
    img = rows // 5
    a = epoch_batches(rows, img, 7, seed=1, epoch=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, epoch_batches(rows, img, 7, seed=1, epoch=3), strict=True))
    assert not np.array_equal(a[0], epoch_batches(rows, img, 7, seed=1, epoch=4)[0])
    assert sorted(np.concatenate(a).tolist()) == rows.tolist()
    blocks = epoch_batches(rows, img, 7, seed=1, epoch=3, block_images=4)
    assert all(len(set((img[b] // 4).tolist())) == 1 for b in blocks)  # a batch never spans two blocks


@pytest.mark.parametrize("model", ["attn", "transformer"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, synth, model):
    data, cache = synth
    cfg = config(model=model, **TINY)
    train(data, cache, tmp_path / "full", cfg, progress=False)

    def ctrl_c(step):
        if step == 4:  # mid-epoch 1 (3 batches per epoch would be too few: 200 captions / 16 = 13)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="continue with --resume"):
        train(data, cache, tmp_path / "cut", cfg, progress=False, step_callback=ctrl_c)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step_in_epoch"] == 4
    with pytest.raises(CaptionsError, match="pass --resume"):
        train(data, cache, tmp_path / "cut", cfg, progress=False)
    train(data, cache, tmp_path / "cut", cfg, resume=True, progress=False)
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["val_loss"] for r in cut] == pytest.approx([r["val_loss"] for r in full], rel=1e-6)
    # the interrupted epoch's running train loss covers its steps before the interruption too
    assert [r["train_loss"] for r in cut] == pytest.approx([r["train_loss"] for r in full], rel=1e-6)
    a = load_checkpoint(tmp_path / "full" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "cut" / "last.pt")["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_killed_run_resumes_from_periodic_checkpoint(tmp_path, synth):
    data, cache = synth
    cfg = config(model="lstm", **{**TINY, "checkpoint_every": 5})
    train(data, cache, tmp_path / "full", cfg, progress=False)

    def die(step):
        if step == 7:
            raise SystemExit("killed")  # stands for SIGKILL: no chance to save; last.pt is from step 5

    with pytest.raises(SystemExit):
        train(data, cache, tmp_path / "cut", cfg, progress=False, step_callback=die)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step_in_epoch"] == 5
    train(data, cache, tmp_path / "cut", cfg, resume=True, progress=False)
    assert read_metrics(tmp_path / "cut")[-1]["val_loss"] == pytest.approx(
        read_metrics(tmp_path / "full")[-1]["val_loss"], rel=1e-6)


def test_refuses_cache_of_another_dataset(tmp_path, synth):
    data, cache = synth
    other = tmp_path / "other"
    prepare_synthetic(other, 12, 4, 4, seed=9, workers=1, progress=False,
                      options=PrepareOptions(min_count=1, image_size=64))
    with pytest.raises(CaptionsError, match="different prepared dataset"):
        train(other, cache, tmp_path / "run", config(model="rnn", **TINY), progress=False)


def test_resume_refuses_checkpoint_with_other_vocabulary(tmp_path, synth):
    data, cache = synth
    run = tmp_path / "run"
    train(data, cache, run, config(model="rnn", **{**TINY, "epochs": 1}), progress=False)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt["vocab"]["hash"] = "f" * 64
    torch.save(ckpt, run / "last.pt")
    with pytest.raises(CaptionsError, match="checkpoint vocabulary .* differs"):
        train(data, cache, run, config(model="rnn", **TINY), resume=True, progress=False)


@pytest.mark.parametrize("model,sizes", [("lstm", ["--embed-dim", "16", "--hidden-dim", "32"]),
                                         ("transformer", ["--d-model", "32", "--heads", "4", "--ffn-dim", "64",
                                                          "--layers", "1", "--tie-embeddings"])])
def test_torchrun_two_ranks_train_with_ddp(tmp_path, synth, model, sizes):
    data, cache = synth
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "captions",
           "train", model, "--data", str(data), "--features", str(cache), "--out", str(run), "--epochs", "2",
           "--batch-size", "8", *sizes, "--scst-epochs", "1", "--quiet"]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(run)
    assert [x["epoch"] for x in rows] == [1, 2, 3]  # only rank 0 writes
    assert rows[2]["phase"] == "self-critical"  # its gradients are reduced by hand (sampling bypasses DDP)
    assert rows[1]["train_loss"] < rows[0]["train_loss"] * 1.5
    assert load_checkpoint(run / "best.pt")["model"] == model
    assert r.stdout.count(f"trained {model}") == 1
    # rank 1 logs warnings only: each info line once, not once per rank
    assert r.stderr.count("training on cpu") == 1 and r.stderr.count("self-critical training from") == 1
    if model == "transformer":  # the warm-up warning is each rank's own: rank 1's says so
        assert r.stderr.count("rank 1: warm-up of 400 steps is longer") == 1, r.stderr


def test_self_critical_epochs_follow_the_cross_entropy_ones_and_resume(tmp_path, synth):
    """--scst-epochs: after the cross-entropy epochs, the best weights go on with self-critical
    epochs (logged with their reward and lr); an interrupted one resumes to the same weights."""
    data, cache = synth
    cfg = config(model="attn", **{**TINY, "epochs": 2, "scst_epochs": 2}, scst_lr=1e-3, patience=5)
    train(data, cache, tmp_path / "full", cfg, progress=False)
    rows = read_metrics(tmp_path / "full")
    assert [r["phase"] for r in rows] == ["cross-entropy"] * 2 + ["self-critical"] * 2
    assert rows[2]["lr"] == pytest.approx(1e-3) and rows[2]["train_reward"] > 0
    scst_from = load_checkpoint(tmp_path / "full" / "last.pt")["scst_from"]
    with pytest.raises(TrainingInterrupted):
        train(data, cache, tmp_path / "cut", cfg, progress=False,
              step_callback=lambda s: s == scst_from + 3 and os.kill(os.getpid(), signal.SIGINT))
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["scst_from"] == scst_from
    train(data, cache, tmp_path / "cut", cfg, resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "cut" / "last.pt")["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_self_critical_loss_raises_the_cider_of_samples():
    from captions.cider import CiderD
    from captions.trainer.scst import self_critical_loss

    torch.manual_seed(0)
    words = ["<NULL>", "<START>", "<END>", "<UNK>", "a", "red", "blue", "car", "boat", "on", "water", "road"]
    cider = CiderD({0: [["a", "red", "car", "on", "road"]] * 2, 1: [["a", "blue", "boat", "on", "water"]] * 2,
                    2: [["a", "car"], ["a", "red", "car"]], 3: [["a", "boat"], ["water"]]})
    model = build_decoder("attn", vocab_size=len(words), feature_dim=6, embed_dim=8, hidden_dim=16)
    feats, ids = torch.randn(4, 3, 6), np.arange(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rewards = []
    for _ in range(60):
        loss, reward = self_critical_loss(model, feats, ids, cider, words, k=5, max_length=8)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rewards.append(reward)
    assert np.mean(rewards[-10:]) > 1.6 * np.mean(rewards[:10])  # 0.55 -> 1.04 here


def test_sampled_captions_stop_at_end():
    from captions.generation import sample_captions

    torch.manual_seed(0)
    for name, feats in (("lstm", torch.randn(3, 6)), ("attn", torch.randn(3, 4, 6))):
        model = build_decoder(name, vocab_size=5, feature_dim=6, embed_dim=4, hidden_dim=8)
        tokens, logps = sample_captions(model, feats, k=4, max_length=12)
        assert tokens.shape[0] == logps.shape[0] == 12 and logps.requires_grad
        for seq, lp in zip(tokens.tolist(), logps, strict=True):
            if 2 in seq:  # <END>: nothing after it
                end = seq.index(2)
                assert all(t == 0 for t in seq[end + 1:]) and bool((lp[end + 1:] == 0).all())
            assert bool((lp[: seq.index(2) + 1 if 2 in seq else len(seq)] < 0).all())


def test_a_checkpoint_of_the_previous_version_loads_decodes_and_resumes(tmp_path, synth):
    """tests/data/checkpoint-v0.1: last.pt of a 1-epoch attn run written by captions before the
    model layer existed (flat train_config, every decoder's settings in decoder_config), on this
    module's synthetic set; expected.json: what that version decoded from it and logged on resume."""
    import shutil

    from captions.generation import greedy_decode
    from captions.models.checkpoint import load_decoder

    fixture = os.path.join(REPO, "tests", "data", "checkpoint-v0.1")
    expected = json.loads(open(os.path.join(fixture, "expected.json")).read())
    dec = load_decoder(os.path.join(fixture, "last.pt"))
    torch.manual_seed(0)
    tokens, scores, _ = greedy_decode(dec.model, torch.randn(3, 4, 512), 8)
    assert tokens.tolist() == expected["greedy_tokens"]
    torch.testing.assert_close(scores, torch.tensor(expected["greedy_scores"]))

    data, cache = synth
    assert load_prepared(data).dataset_hash == expected["dataset_hash"]
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(os.path.join(fixture, "last.pt"), run / "last.pt")
    # the settings that version's run was made with (tests/data/checkpoint-v0.1 was written by its make.py)
    base = dict(batch_size=16, embed_dim=8, hidden_dim=8, attention_dim=8, lr=3e-3, dropout=0.1, checkpoint_every=0,
                eval_batch_size=64, scst_epochs=0)
    result = train(data, cache, run, config(model="attn", epochs=2, **base), resume=True, progress=False)
    assert result["epochs_run"] == 2
    (row,) = read_metrics(run)
    for key, value in expected["epoch2"].items():
        assert row[key] == (pytest.approx(value, rel=1e-5, abs=1e-9) if isinstance(value, float) else value), key


def test_train_reads_a_config_file_and_flags_override_it(tmp_path, synth):
    from click.testing import CliRunner

    from captions.cli import main

    data, cache = synth
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"model: lstm\ndata: {data}\nfeatures: {cache}\nepochs: 1\nbatch-size: 16\nhidden_dim: 16\n"
                        f"embed_dim: 8\nlr: 3e-3\nscst_epochs: 0\ncheckpoint_every: 0\nfeature_as_input: true\n")
    result = CliRunner().invoke(main, ["train", "--config", str(cfg_file), "--out", str(tmp_path / "run"),
                                       "--hidden-dim", "24", "--quiet"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"] == "lstm" and saved["epochs"] == 1 and saved["lr"] == 3e-3
    assert saved["decoder"] == {"embed_dim": 8, "hidden_dim": 24, "dropout": 0.5, "embed_dropout": 0.0,
                                "feature_as_input": True}
    assert load_checkpoint(tmp_path / "run" / "best.pt")["decoder_config"]["hidden_dim"] == 24
    # a flag turns off what the file turned on
    off = CliRunner().invoke(main, ["train", "--config", str(cfg_file), "--out", str(tmp_path / "off"),
                                    "--no-feature-as-input", "--quiet"])
    assert off.exit_code == 0, off.output
    assert json.loads((tmp_path / "off" / "config.json").read_text())["decoder"]["feature_as_input"] is False
    # the saved config runs the same training again
    again = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "run" / "config.json"), "--data", str(data),
                                      "--features", str(cache), "--out", str(tmp_path / "again"), "--quiet"])
    assert again.exit_code == 0, again.output
    assert read_metrics(tmp_path / "again")[0]["val_loss"] == read_metrics(tmp_path / "run")[0]["val_loss"]


@pytest.mark.parametrize("text,args,message", [
    ("epochs: 1\nwarmup: 3\n", ["lstm"], "unknown setting(s) warmup"),
    ("epochs: [1, 2]\n", ["lstm"], "epochs must be a whole number"),
    ("epochs:\n", ["lstm"], "epochs needs a value"),
    ("epochs: 1.7\n", ["lstm"], "epochs must be a whole number"),
    ("epochs: true\n", ["lstm"], "epochs must be a whole number"),
    ("lr: .nan\n", ["lstm"], "lr must be a finite number"),
    ("lr: -1\n", ["lstm"], "lr must be >= 0"),
    ("decoder: 5\n", ["lstm"], "decoder must be a mapping"),
    ("feature_as_input: 1.5\n", ["lstm"], "feature_as_input must be true or false"),
    ("attention: additive\n", ["lstm"], "--attention does not apply to lstm (in"),
    ("resume: true\n", ["lstm"], "unknown setting(s) resume"),
    ("schedule: linear\n", ["lstm"], "schedule must be one of cosine, step, none"),
    ("epochs: 1\n", ["lstm", "--attention", "additive"], "--attention does not apply to lstm"),
    ("epochs: 1\n", [], "missing MODEL"),
    ("epochs: [\n", ["lstm"], "not valid YAML (expected the node content, but found '<stream end>', line 2, column 1)"),
    ("scst-epochs: 4\n\tlr: 0.1\n", ["lstm"], "found character '\\t' that cannot start any token, line 2, column 1"),
    ("latin-1", ["lstm"], "not UTF-8 text"),
    ("lr: 0.1\nepochs: 2\nlr: 0.2\n", ["lstm"], "not valid YAML (found duplicate key 'lr', line 3, column 1)"),
    ("scst-epochs: 1\nscst_epochs: 2\n", ["lstm"], "scst-epochs is given twice"),
    ("embed_dim: 8\ndecoder:\n  embed-dim: 16\n", ["lstm"], "embed-dim is given twice (also under decoder)"),
    ('{"lr": 0.1, "lr": 0.2}', ["lstm"], "not valid JSON (key 'lr' appears twice in one object)"),
])
def test_train_refuses_bad_settings_in_one_line(tmp_path, synth, text, args, message):
    from click.testing import CliRunner

    from captions.cli import main

    data, cache = synth
    cfg_file = tmp_path / ("bad.json" if text.startswith("{") else "bad.yaml")
    cfg_file.write_text(text)
    if text == "latin-1":
        cfg_file.write_bytes(b"\xff\xfeepochs: 1\n")
    result = CliRunner().invoke(main, ["train", *args, "--config", str(cfg_file), "--data", str(data),
                                       "--features", str(cache), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_transformer_captions_new_images_with_maps_of_the_grid(tmp_path, synth):
    from captions.captioner import Captioner
    from captions.evaluation import evaluate_checkpoint

    data, cache = synth
    train(data, cache, tmp_path / "run", config(model="transformer", **{**TINY, "epochs": 1}), progress=False)
    record = evaluate_checkpoint(tmp_path / "run" / "best.pt", data, cache, split="val", beam_size=2,
                                 device="cpu", out=tmp_path / "eval")
    assert record["model"] == "transformer" and record["images"] == 8
    ds = load_prepared(data)
    captioner = Captioner.from_checkpoint(tmp_path / "run" / "best.pt", device="cpu")
    results = captioner.caption([ds.image_path(i) for i in ds.split_image_ids("val")[:3]], beam_size=2)
    for res in results:
        assert res.error is None and res.words
        assert res.attention.shape == (len(res.words), *captioner.spatial_shape)
        assert np.allclose(res.attention.sum(axis=(1, 2)), 1.0, atol=1e-5)


def test_resume_applies_the_settings_that_may_change_and_refuses_the_others(tmp_path, synth):
    from click.testing import CliRunner

    from captions.cli import main

    data, cache = synth
    run = tmp_path / "run"
    common = ["--data", str(data), "--features", str(cache), "--out", str(run), "--quiet", "--batch-size", "16",
              "--hidden-dim", "16", "--embed-dim", "8", "--checkpoint-every", "0"]
    first = CliRunner().invoke(main, ["train", "lstm", *common, "--epochs", "1", "--scst-epochs", "0"])
    assert first.exit_code == 0, first.output
    for extra, message in [(["--lr", "0.5"], "--lr 0.001 (asked --lr 0.5)"),
                           (["--hidden-dim", "32"], "--hidden-dim 16"),
                           (["--no-feature-as-input", "--batch-size", "8"], "--batch-size 16 (asked --batch-size 8)")]:
        args = ["train", "lstm", *common, *extra, "--resume"]
        refused = CliRunner().invoke(main, args)
        assert refused.exit_code == 1 and message in refused.output and refused.output.count("\n") == 1, \
            refused.output
    wrong_model = CliRunner().invoke(main, ["train", "rnn", *common, "--resume"])
    assert wrong_model.exit_code == 1 and "model lstm (asked model rnn)" in wrong_model.output
    # not repeating --epochs keeps the stored 1 (nothing left to do); more epochs are applied and logged
    again = CliRunner().invoke(main, ["train", "lstm", *common, "--resume"])
    assert again.exit_code == 0 and len(read_metrics(run)) == 1
    more = CliRunner().invoke(main, ["train", "lstm", *common, "--resume", "--epochs", "2", "--scst-epochs", "1"])
    assert more.exit_code == 0, more.output
    assert [r["phase"] for r in read_metrics(run)] == ["cross-entropy", "cross-entropy", "self-critical"]
    assert json.loads((run / "config.json").read_text())["scst_epochs"] == 1
    # once self-critical training has begun, more cross-entropy epochs would interleave the phases
    mixed = CliRunner().invoke(main, ["train", "lstm", *common, "--resume", "--epochs", "3", "--scst-epochs", "2"])
    assert mixed.exit_code == 1 and "once self-critical training has begun" in mixed.output


def test_a_second_run_into_the_same_out_is_refused_while_the_first_holds_it(tmp_path, synth):
    data, cache = synth

    def second_run(step):
        if step == 2:
            with pytest.raises(CaptionsError, match=rf"another 'captions train' \(pid {os.getpid()} on \S+\) holds "
                                                    rf".*\.train\.lock"):
                train(data, cache, tmp_path / "run", config(model="rnn", **TINY), progress=False)

    train(data, cache, tmp_path / "run", config(model="rnn", **TINY), progress=False, step_callback=second_run)
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    assert not (tmp_path / "run" / ".train.lock.pid").exists()


def test_an_output_under_a_file_is_one_line(tmp_path, synth):
    from click.testing import CliRunner

    from captions.cli import main

    data, cache = synth
    (tmp_path / "afile").write_text("")
    result = CliRunner().invoke(main, ["train", "rnn", "--data", str(data), "--features", str(cache),
                                       "--out", str(tmp_path / "afile" / "run")])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {tmp_path / 'afile'}"), result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_resume_drops_what_an_uncommitted_epoch_wrote(tmp_path, synth):
    """What a run killed during an epoch's commit left (the epoch's metrics row, a half-written
    line, staged checkpoints, a temporary file) is dropped on resume and the epoch redone; a
    checkpoint from before metrics_bytes was recorded keeps the rows of its own epochs."""
    data, cache = synth
    cfg = config(model="rnn", **{**TINY, "epochs": 2})
    train(data, cache, tmp_path / "full", cfg, progress=False)
    run = tmp_path / "cut"

    def kill_in_epoch_2(step):
        if (run / "metrics.jsonl").exists():  # epoch 1 is committed
            raise SystemExit("killed")

    with pytest.raises(SystemExit):
        train(data, cache, run, cfg, progress=False, step_callback=kill_in_epoch_2)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    del ckpt["metrics_bytes"]  # as written before it was recorded
    torch.save(ckpt, run / "last.pt")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "phase": "cross-entropy", "val_loss": 0.0}) + '\n{"epoch": 3, "ph')
    (run / ".epoch-2").mkdir()
    (run / ".epoch-2" / "best.pt").write_bytes(b"an uncommitted epoch's")
    (run / ".last.pt.tmp-99999").write_bytes(b"a save that was killed")
    train(data, cache, run, cfg, resume=True, progress=False)
    rows, want = read_metrics(run), read_metrics(tmp_path / "full")
    assert [r["val_loss"] for r in rows] == pytest.approx([r["val_loss"] for r in want], rel=1e-6)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in (tmp_path / "full").iterdir())
    assert load_checkpoint(run / "best.pt")["epoch"] == load_checkpoint(tmp_path / "full" / "best.pt")["epoch"]


def test_a_finished_run_without_last_pt_is_refused_not_overwritten(tmp_path, synth):
    """best.pt is only moved into place by an epoch's commit (last.pt): a run that lost last.pt
    is refused, with or without --resume, and its best.pt is kept as it was."""
    data, cache = synth
    cfg = config(model="rnn", **{**TINY, "epochs": 1})
    run = tmp_path / "run"
    train(data, cache, run, cfg, progress=False)
    (run / "last.pt").unlink()
    best = (run / "best.pt").read_bytes()
    for resume in (True, False):
        with pytest.raises(CaptionsError, match="holds best.pt of a run but no last.pt"):
            train(data, cache, run, cfg, resume=resume, progress=False)
    assert (run / "best.pt").read_bytes() == best


def _written_before(path, *names, from_decoder_config=True):
    """Rewrite checkpoint ``path`` as a version that stored none of the settings ``names`` wrote it."""
    ckpt = load_checkpoint(path)
    ckpt["train_config"]["decoder"] = {k: v for k, v in ckpt["train_config"]["decoder"].items() if k not in names}
    if from_decoder_config:
        ckpt["decoder_config"] = {k: v for k, v in ckpt["decoder_config"].items() if k not in names}
    torch.save(ckpt, path)


@pytest.mark.parametrize("memory_dropout,from_decoder_config", [(0.2, False), (0.0, True)])
def test_a_resumed_run_keeps_the_decoder_it_was_built_with(tmp_path, synth, memory_dropout, from_decoder_config):
    """A run keeps the decoder it was built with when resumed or continued with --init-from: a
    setting whose default changed since (stored only in ``decoder_config``, not among the settings
    the run was given), and settings added since (stored nowhere: ``absent_means``; the first
    transformers had no memory dropout and no global feature), not today's defaults (0.5, on)."""
    from captions.models.checkpoint import load_decoder

    data, cache = synth
    run = tmp_path / "run"
    first = {"memory_dropout": memory_dropout, "global_feature": False}
    settings = {**TINY, "epochs": 1, **first}
    train(data, cache, run, config(model="transformer", **settings), progress=False)
    _written_before(run / "last.pt", "memory_dropout", "global_feature", from_decoder_config=from_decoder_config)
    assert load_decoder(run / "last.pt").model.global_proj is None
    wrong = load_checkpoint(run / "last.pt")
    wrong["decoder_config"]["global_feature"] = True  # a decoder config its weights do not fit
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CaptionsError, match=r"usable decoder \(RuntimeError: .*Missing key.*global_proj"):
        load_decoder(tmp_path / "wrong.pt")  # the reason, not only load_state_dict's first line

    plain = {k: v for k, v in settings.items() if k not in first}
    scst = config(model="transformer", **{**plain, **first, "scst_epochs": 1, "init_from": str(run / "last.pt")})
    train(data, cache, tmp_path / "continued", scst, progress=False)  # not refused: the same decoder
    today = config(model="transformer", **{**plain, "memory_dropout": memory_dropout, "scst_epochs": 1,
                                           "init_from": str(run / "last.pt")})
    with pytest.raises(CaptionsError, match=r"settings differ: --no-global-feature \(here --global-feature\)"):
        train(data, cache, tmp_path / "today", today, progress=False)  # today's default is another decoder
    result = train(data, cache, run, config(model="transformer", **{**plain, "epochs": 2}), resume=True,
                   progress=False, given=["epochs"])
    assert result["epochs_run"] == 2
    resumed = load_checkpoint(run / "last.pt")
    assert resumed["decoder_config"]["memory_dropout"] == memory_dropout
    assert resumed["decoder_config"]["global_feature"] is False

"""Encoder fine-tuning (--fine-tune-encoder): which weights train, resume, and evaluate / caption
with the fine-tuned encoder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from captions.captioner import Captioner
from captions.errors import CaptionsError
from captions.evaluation import evaluate_checkpoint
from captions.features.backbones import build_backbone
from captions.features.cache import FeatureCache
from captions.features.extract import load_crops
from captions.models.checkpoint import load_checkpoint
from captions.pipeline.prepared import load_prepared
from captions.trainer.config import FINE_TUNE_SETTINGS, TrainConfig
from captions.trainer.phases import SCST_START
from captions.trainer.state import CROSS_ENTROPY, FINE_TUNE, SELF_CRITICAL, TrainState
from captions.trainer.train import decide, train
from tests.conftest import cli

REPO = Path(__file__).resolve().parents[1]
TINY = dict(model="attn", epochs=1, batch_size=16, embed_dim=16, hidden_dim=32, attention_dim=16, lr=3e-3,
            checkpoint_every=0, eval_batch_size=64, scst_epochs=0, fine_tune_encoder=True, encoder_epochs=1,
            fine_tune_from_block=-1, fine_tune_workers=0)
PLAIN = {**{k: v for k, v in TINY.items() if k not in FINE_TUNE_SETTINGS}, "fine_tune_encoder": False}


@pytest.fixture(scope="module")
def tuned(synth, tmp_path_factory):
    """One run through the command line: 1 cross-entropy, 1 fine-tune (layer3, layer4 and what
    follows them train) and 1 self-critical epoch."""
    data, cache = synth
    run = tmp_path_factory.mktemp("tuned") / "run"
    r = cli("train", "attn", "--data", data, "--features", cache, "--out", run, "--device", "cpu", "--epochs", 1,
            "--batch-size", 16, "--embed-dim", 16, "--hidden-dim", 32, "--attention-dim", 16, "--lr", 3e-3,
            "--fine-tune-encoder", "--encoder-epochs", 1, "--fine-tune-from-block", -2, "--encoder-lr", 1e-3,
            "--fine-tune-workers", 0, "--scst-epochs", 1, "--quiet")
    assert r.exit_code == 0, r.output
    return data, cache, run


def test_fine_tuning_trains_the_blocks_from_k_and_freezes_the_rest(tuned):
    _, _, run = tuned
    phases = [json.loads(line)["phase"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert phases == [CROSS_ENTROPY, FINE_TUNE, SELF_CRITICAL]
    ckpt = load_checkpoint(run / "last.pt")  # weights_only=True
    before = build_backbone("resnet18", "none", 64).model.state_dict()
    after = ckpt["encoder"]["state_dict"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("layer4.") for k in changed) and any(k.startswith("layer3.") for k in changed)
    assert not any(k.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "fc.")) for k in changed)
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    # the features of the self-critical epoch came from the tuned encoder, re-extracted into the run
    assert ckpt["features"]["weights"].startswith("sha256:")
    assert ckpt["encoder"]["base_features"]["weights"] == "random"
    assert len(list(run.glob("features-*.h5"))) == 1 and len(list(run.glob("encoder-*.pt"))) == 1


def test_evaluate_refuses_the_old_cache_and_runs_the_tuned_encoder(tuned, tmp_path, no_java):
    data, cache, run = tuned
    with pytest.raises(CaptionsError, match="leave out --features") as e:
        evaluate_checkpoint(run / "last.pt", data, cache, split="val", out=tmp_path / "old")
    assert "\n" not in str(e.value)
    r = cli("evaluate", run / "last.pt", "--data", data, "--features", cache, "--split", "val", "--quiet")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "fine-tuned" in r.output
    encoded = evaluate_checkpoint(run / "last.pt", data, None, split="val", out=tmp_path / "enc")
    tuned_cache = next(run.glob("features-*.h5"))
    cached = evaluate_checkpoint(run / "last.pt", data, tuned_cache, split="val", out=tmp_path / "cached")
    assert encoded["images"] == cached["images"] == 8 and encoded["metrics"] == cached["metrics"]
    preds = [json.loads((tmp_path / d / "predictions.json").read_text()) for d in ("enc", "cached")]
    assert preds[0] == preds[1]  # the encoder run here gives the features the run extracted


def test_caption_uses_the_tuned_encoder(tuned):
    data, cache, run = tuned
    ds = load_prepared(data)
    image = int(ds.split_image_ids("val")[0])
    cap = Captioner.from_checkpoint(run / "last.pt", device="cpu")
    _, x, _ = load_crops([ds.image_path(image)], [0], cap.preprocessing)
    mine = cap.features(x)[0]
    with FeatureCache(cache) as old:
        before = torch.from_numpy(np.asarray(old.array("spatial")[image])).float()
    with FeatureCache(next(run.glob("features-*.h5"))) as new:
        after = torch.from_numpy(np.asarray(new.array("spatial")[image])).float()
    scale = float(after.abs().max())
    assert float((mine - after).abs().max()) <= 2e-3 * scale  # float16 rounding of the stored features
    assert float((mine - before).abs().max()) > 0.05 * scale
    r = cli("caption", ds.image_path(image), "--checkpoint", run / "last.pt", "--device", "cpu")
    assert r.exit_code == 0, r.output


def test_resumed_fine_tuning_equals_an_uninterrupted_run(tuned, tmp_path):
    """Killed mid fine-tune epoch (decode workers, flip-crop augmentation), resumed from the last
    periodic checkpoint: the same weights, encoder and decoder, and the same val loss."""
    data, cache, run = tuned
    cfg = TrainConfig.from_dict({**TINY, "checkpoint_every": 4, "augment": "flip-crop", "fine_tune_workers": 2,
                                 "init_from": str(run / SCST_START)})
    train(data, cache, tmp_path / "full", cfg, progress=False)

    def die(step):
        if step == 6:
            raise SystemExit("killed")

    with pytest.raises(SystemExit):
        train(data, cache, tmp_path / "cut", cfg, progress=False, step_callback=die)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step_in_epoch"] == 4
    train(data, cache, tmp_path / "cut", cfg, resume=True, progress=False)
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("full", "cut"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    ea, eb = a["encoder"]["state_dict"], b["encoder"]["state_dict"]
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    rows = [[json.loads(line)["val_loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("full", "cut")]
    assert rows[0] == rows[1] and len(rows[0]) == 1


def test_init_from_starts_at_the_fine_tune_phase(tuned, tmp_path):
    data, cache, run = tuned
    start = run / SCST_START  # the cross-entropy epoch, without an encoder
    cfg = TrainConfig.from_dict({**TINY, "init_from": str(start)})
    train(data, cache, tmp_path / "ft", cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["phase"]) for r in rows] == [(2, FINE_TUNE)]
    before = load_checkpoint(start)
    assert rows[0]["val_loss"] < before["best"]["val_loss"] + 1.0  # it continued from the trained decoder
    assert load_checkpoint(tmp_path / "ft" / "last.pt")["encoder"]["base_features"]["weights"] == "random"
    other = TrainConfig.from_dict({**PLAIN, "scst_epochs": 1, "hidden_dim": 48,
                                   "init_from": str(start)})
    with pytest.raises(CaptionsError, match=r"its decoder settings differ: --hidden-dim 32 \(here --hidden-dim 48\)"):
        train(data, cache, tmp_path / "other", other, progress=False)
    lstm = TrainConfig.from_dict({**PLAIN, "model": "lstm", "scst_epochs": 1, "init_from": str(start)})
    with pytest.raises(CaptionsError, match="its decoder is attn, this run trains lstm"):
        train(data, cache, tmp_path / "lstm", lstm, progress=False)


def test_an_image_unreadable_since_extraction_is_left_out_of_fine_tuning(tuned, tmp_path, caplog):
    data, cache, run = tuned
    copy = tmp_path / "prep"
    shutil.copytree(data, copy)
    ds = load_prepared(copy)
    broken = ds.image_path(int(ds.split_image_ids("train")[0]))
    broken.write_bytes(b"not an image any more")
    gone = ds.image_path(int(ds.split_image_ids("val")[0]))
    gone.unlink()
    cfg = TrainConfig.from_dict({**TINY, "init_from": str(run / SCST_START)})
    train(copy, cache, tmp_path / "ft", cfg, progress=False)
    said = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(said) == 1 and str(broken) in said[0]
    said = [r.getMessage() for r in caplog.records if "left out of this epoch's val scores" in r.getMessage()]
    assert len(said) == 1 and str(gone) in said[0]  # a val image: scored without it, the run goes on
    rows = (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["CIDEr"] is not None
    record = evaluate_checkpoint(tmp_path / "ft" / "last.pt", copy, None, split="val", out=tmp_path / "ev")
    assert (record["images"], record["images_left_out"]) == (7, 1)  # evaluate leaves it out and says so


@pytest.mark.slow
def test_torchrun_two_ranks_fine_tune(synth, tmp_path):
    """DDP: the decoder through DistributedDataParallel, the encoder's gradients averaged by hand,
    the re-extraction shared by the ranks; one rank writes."""
    data, cache = synth
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "captions",
           "train", "attn", "--data", str(data), "--features", str(cache), "--out", str(run), "--epochs", "1",
           "--batch-size", "8", "--embed-dim", "16", "--hidden-dim", "32", "--attention-dim", "16",
           "--fine-tune-encoder", "--encoder-epochs", "1", "--fine-tune-from-block", "-1", "--fine-tune-workers", "1",
           "--scst-epochs", "1", "--quiet"]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["phase"] for x in rows] == [CROSS_ENTROPY, FINE_TUNE, SELF_CRITICAL]
    assert load_checkpoint(run / "last.pt")["encoder"]["from_block"] == -1


def test_phase_switches_with_a_fine_tune_phase():
    cfg = TrainConfig.from_dict({**TINY, "epochs": 3, "encoder_epochs": 2, "scst_epochs": 2, "patience": 1})
    row = {"epoch": 1, "val_loss": 1.0, "BLEU-4": 0.1, "CIDEr": 0.5}
    worse = {**row, "val_loss": 2.0, "CIDEr": 0.1}
    d = decide(TrainState(epoch=0, best=row), worse, cfg, scst=False, has_val=True, phase=CROSS_ENTROPY)
    assert (d.next_epoch, d.stop) == (3, False)  # early stop in cross-entropy: on to fine-tuning
    d = decide(TrainState(epoch=3, best=row), worse, cfg, scst=False, has_val=True, phase=FINE_TUNE)
    assert (d.next_epoch, d.stop, d.lower_loss) == (5, False, False)  # on to self-critical training
    assert TrainState(epoch=4).phase(3, 2) == FINE_TUNE and TrainState(epoch=5).phase(3, 2) == SELF_CRITICAL
    with pytest.raises(CaptionsError, match="--init-from skips"):
        TrainConfig.from_dict({**PLAIN, "init_from": "x.pt"}).validate()
    with pytest.raises(CaptionsError, match="--ema averages the decoder alone"):
        TrainConfig.from_dict({**TINY, "ema": 0.99}).validate()
    with pytest.raises(CaptionsError, match="--fine-tune-from-block, --augment: only with --fine-tune-encoder"):
        TrainConfig.from_dict({**PLAIN, "fine_tune_from_block": 50,
                               "augment": "flip-crop"}).validate()

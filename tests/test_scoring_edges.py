"""Scoring edges (issue 17): CIDEr is undefined below two images (reported as such, never 0, and
never used to select or stop training); a split whose images all lack features is one error line;
``captions caption`` never prints an empty caption or ``<UNK>``, and refuses degenerate images."""

from __future__ import annotations

import json
import logging
import shutil

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from captions.captioner import Captioner
from captions.evaluation import evaluate_checkpoint
from captions.metrics import per_image_cider, score_captions
from captions.models.checkpoint import load_checkpoint, save_checkpoint
from captions.pipeline.prepared import load_prepared
from captions.pipeline.vocab import END_ID, UNK_ID
from captions.trainer.config import TrainConfig
from captions.trainer.state import TrainState
from captions.trainer.train import decide
from tests.conftest import cli, cli_run

SIZE = 64


def one_error_line(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert all(f in lines[0] for f in fragments), lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A synthetic set with one val and one test image, its features, and an lstm trained on it."""
    return cli_run(tmp_path_factory.mktemp("one-image-val"), "16,1,2", SIZE, "lstm", "--epochs", 3, "--patience", 1,
                   "--batch-size", 16, "--embed-dim", 16, "--hidden-dim", 32, "--lr", 1e-2)


# ------------------------------------------------------------------------------------------------ scorer
def test_cider_of_one_image_is_undefined_not_zero(caplog):
    refs = {1: ["a red car on a road", "a car"], 2: ["two dogs play", "dogs in a park"]}
    with caplog.at_level(logging.WARNING, logger="captions"):
        one = score_captions({1: refs[1]}, {1: "a red car on a road"}, metrics=("bleu", "cider"))
    assert "CIDEr" not in one and one["BLEU-1"] == pytest.approx(1.0)
    assert "CIDEr is undefined for 1 image" in caplog.text
    assert per_image_cider({1: refs[1]}, {1: "a car"}) == {}
    two = score_captions(refs, {1: "a red car on a road", 2: "two dogs play"}, metrics=("cider",))
    assert two["CIDEr"] > 1.0


def row(epoch: int, loss: float, cider: float | None) -> dict:
    return {"epoch": epoch, "val_loss": loss, "BLEU-4": 0.0, "CIDEr": cider}


def test_decide_falls_back_to_val_loss_when_cider_is_undefined():
    cfg = TrainConfig.from_dict({"model": "lstm", "epochs": 10, "patience": 2, "scst_epochs": 0})
    state = TrainState()
    chosen = []
    for epoch, loss in enumerate([5.0, 4.0, 4.5, 3.9, 4.2, 4.3], start=1):
        d = decide(state, row(epoch, loss, None), cfg, scst=False, has_val=True)
        assert d.by == "val loss"
        if d.improved:
            state.best = row(epoch, loss, None)
            chosen.append(epoch)
        state.bad_epochs, state.epoch = d.bad_epochs, d.next_epoch
        if d.stop:
            break
    assert chosen == [1, 2, 4] and epoch == 6  # lowest loss kept; stopped after 2 epochs without a lower one
    # with CIDEr defined, CIDEr decides as before
    d = decide(TrainState(best=row(1, 1.0, 0.5)), row(2, 9.0, 0.6), cfg, scst=False, has_val=True)
    assert d.improved and d.by == "CIDEr"


def test_training_on_one_val_image_selects_by_val_loss(tiny):
    rows = [json.loads(line) for line in (tiny["run"] / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["CIDEr"] is None for r in rows)
    best = min(rows, key=lambda r: r["val_loss"])
    assert load_checkpoint(tiny["run"] / "best.pt")["best"]["epoch"] == best["epoch"]
    assert "(CIDEr undefined)" in tiny["train_output"] and f"best epoch {best['epoch']}" in tiny["train_output"]


def test_evaluate_and_baseline_report_undefined_cider_on_one_image(tiny, tmp_path, no_java):
    record = evaluate_checkpoint(tiny["run"] / "best.pt", tiny["data"], tiny["feats"], split="val", beam_size=2,
                                 out=tmp_path / "ev")
    assert record["images"] == 1 and "CIDEr" not in record["metrics"] and record["undefined_metrics"] == ["CIDEr"]
    r = cli("baseline", "nn", "--data", tiny["data"], "--features", tiny["feats"], "--split", "val", "-k", 2,
            "--out", tmp_path / "nn")
    assert r.exit_code == 0, r.output
    assert "undef" in r.output and "undefined: CIDEr (fewer than two images)" in r.output
    saved = json.loads((tmp_path / "nn" / "metrics.json").read_text())
    assert "CIDEr" not in saved["metrics"] and saved["undefined_metrics"] == ["CIDEr"]


def test_a_split_without_features_is_one_error_line(tiny, tmp_path, no_java):
    feats = tmp_path / "feats.h5"
    shutil.copy(tiny["feats"], feats)
    test_ids = load_prepared(tiny["data"]).split_image_ids("test")
    with h5py.File(feats, "r+") as f:
        valid = f["valid"][:]
        valid[test_ids] = False
        f["valid"][:] = valid
    message = "none of the 2 'test' image(s) has features"
    one_error_line(cli("evaluate", tiny["run"] / "best.pt", "--data", tiny["data"], "--features", feats,
                       "--split", "test", "--out", tmp_path / "ev"), "feats.h5", message)
    one_error_line(cli("baseline", "nn", "--data", tiny["data"], "--features", feats, "--split", "test",
                       "--out", tmp_path / "nn"), "feats.h5", message)
    assert not (tmp_path / "ev" / "metrics.json").exists() and not (tmp_path / "nn" / "metrics.json").exists()


# ------------------------------------------------------------------------------------------------ caption
def test_caption_never_prints_an_empty_caption_or_unk_and_refuses_degenerate_images(tiny, tmp_path):
    """A checkpoint whose <END> right after <START>, and <UNK>, outscore every word (as label
    smoothing and rare words can make them): still a caption of real words, at any beam width. A
    20000 x 1 image is refused in one line; a wide one is cropped to its centre before resizing."""
    ckpt = load_checkpoint(tiny["run"] / "best.pt")
    with torch.no_grad():
        ckpt["state_dict"]["out.bias"][END_ID] += 30.0
        ckpt["state_dict"]["out.bias"][UNK_ID] += 15.0
    eager = tmp_path / "eager.pt"
    save_checkpoint(eager, {k: v for k, v in ckpt.items() if k not in ("format", "format_version")})
    img, strip, wide = load_prepared(tiny["data"]).image_path(0), tmp_path / "strip.png", tmp_path / "wide.png"
    Image.new("RGB", (20000, 1), (255, 0, 0)).save(strip)
    pixels = np.zeros((40, 200, 3), dtype=np.uint8)
    pixels[:, 80:120] = 255  # a white centre square on black
    Image.fromarray(pixels).save(wide)
    vocab = len(ckpt["vocab"]["idx_to_token"])

    r = cli("caption", img, strip, "--checkpoint", eager, "--beam-size", vocab, "--device", "cpu", "--json")
    assert r.exit_code == 1  # the strip
    (error,) = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert "strip.png" in error and "image refused" in error and "aspect ratio over 20:1" in error
    out = json.loads(r.stdout)[0]
    assert len(out["words"]) >= 1 and "<UNK>" not in out["words"]

    captioner = Captioner.from_checkpoint(eager, device="cpu")
    assert captioner.caption([img], beam_size=vocab, min_length=0, allow_unk=True)[0].words == []  # the old answer
    assert "<UNK>" in captioner.caption([img], beam_size=3, allow_unk=True)[0].words
    (four, centred) = captioner.caption([img, wide], beam_size=3, min_length=4)
    assert len(four.words) >= 4 and "<UNK>" not in four.words
    assert np.asarray(centred.crop).min() > 230  # the backbone saw the centre square only

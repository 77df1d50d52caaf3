"""``captions evaluate`` and ``captions caption``: an end-to-end CLI run on a tiny synthetic set,
the captioner re-running the checkpoint's backbone exactly, and the refusals."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.serve_load import png_header_only
from captions import metrics
from captions.attention_maps import grid_size, tile_box
from captions.captioner import Captioner
from captions.errors import CaptionsError
from captions.evaluation import evaluate_checkpoint
from captions.features.cache import FeatureCache
from captions.fsutil import sha256_file
from captions.models.checkpoint import load_checkpoint, save_checkpoint
from captions.pipeline.prepared import load_prepared
from captions.trainer.train import TrainConfig, train
from tests.conftest import cli, cli_run

SIZE = 64  # CNN input: resnet18 gives a 2 x 2 feature grid


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """prepare -> extract-features -> train (attn) through the CLI, as a user would."""
    return cli_run(tmp_path_factory.mktemp("e2e"), "24,8,8", SIZE, "attn", "--epochs", 2, "--batch-size", 32,
                   "--embed-dim", 16, "--hidden-dim", 32, "--lr", 3e-3)


@pytest.fixture(scope="module")
def captioner(run):
    return Captioner.from_checkpoint(run["ckpt"], device="cpu")


def test_evaluate_cli_json_and_files(run, tmp_path, no_java):
    out = tmp_path / "eval"
    r = cli("evaluate", run["ckpt"], "--data", run["data"], "--features", run["feats"], "--split", "test",
            "--beam-size", 2, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert set(record["metrics"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    assert record["skipped_metrics"] == ["METEOR"]
    assert all(0.0 <= v <= 10.0 for v in record["metrics"].values())
    assert record["images"] == 8 and record["split"] == "test" and record["beam_size"] == 2
    assert json.loads((out / "metrics.json").read_text()) == record
    preds = json.loads((out / "predictions.json").read_text())  # COCO results format
    ds = load_prepared(run["data"])
    assert sorted(p["image_id"] for p in preds) == ds.split_image_ids("test").tolist()
    assert all(isinstance(p["caption"], str) and p["file_name"].endswith(".jpg") for p in preds)

    r = cli("evaluate", run["ckpt"], "--data", run["data"], "--features", run["feats"], "--split", "val",
            "--beam-size", 1, "--quiet")
    assert r.exit_code == 0, r.output
    assert "BLEU-4" in r.stdout and "CIDEr" in r.stdout
    assert (run["ckpt"].parent / "eval-best-val-beam1" / "metrics.json").exists()  # default --out


@pytest.mark.slow
def test_evaluate_with_meteor(run, tmp_path):
    if not metrics.java_available():
        pytest.skip("java is not on PATH")
    r = cli("evaluate", run["ckpt"], "--data", run["data"], "--features", run["feats"], "--out", tmp_path, "--json")
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert set(record["metrics"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert record["skipped_metrics"] == [] and 0.0 <= record["metrics"]["METEOR"] <= 1.0


def test_evaluate_without_java_reports_the_rest(run, tmp_path, no_java, caplog):
    with caplog.at_level(logging.WARNING, logger="captions"):
        record = evaluate_checkpoint(run["ckpt"], run["data"], run["feats"], split="test", beam_size=1,
                                     out=tmp_path / "a")
        evaluate_checkpoint(run["ckpt"], run["data"], run["feats"], split="val", beam_size=1, out=tmp_path / "b")
    assert "METEOR" not in record["metrics"] and record["skipped_metrics"] == ["METEOR"]
    assert {"BLEU-4", "ROUGE-L", "CIDEr"} <= set(record["metrics"])
    assert sum("METEOR skipped" in m for m in caplog.messages) == 1  # said once


def test_evaluate_refuses_mismatches(run, tmp_path, no_java):
    with pytest.raises(CaptionsError, match="no images in split 'nope'"):
        evaluate_checkpoint(run["ckpt"], run["data"], run["feats"], split="nope", out=tmp_path)
    ckpt = load_checkpoint(run["ckpt"])
    ckpt["features"] = {**ckpt["features"], "image_size": 96}
    other = tmp_path / "other.pt"
    save_checkpoint(other, {k: v for k, v in ckpt.items() if k not in ("format", "format_version")})
    r = cli("evaluate", other, "--data", run["data"], "--features", run["feats"])
    assert r.exit_code == 1 and "trained on other features" in r.output and "image_size" in r.output


def write_odd_images(folder):
    """A wide RGBA PNG, a grayscale JPEG rotated by EXIF, and a text file named like an image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (90, 300, 4), dtype=np.uint8), "RGBA")
    rgba.save(folder / "wide.png")
    gray = Image.fromarray(rng.integers(0, 256, (120, 80), dtype=np.uint8), "L")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    gray.save(folder / "gray.jpg", exif=exif)
    (folder / "notes.jpg").write_text("this is not an image\n")
    return [folder / "wide.png", folder / "notes.jpg", folder / "gray.jpg"]


def test_caption_cli_images_attention_maps_and_a_bad_file(run, tmp_path):
    ds = load_prepared(run["data"])
    test_img = ds.image_path(int(ds.split_image_ids("test")[0]))
    images = [*write_odd_images(tmp_path / "in"), test_img]
    maps = tmp_path / "maps"
    r = cli("caption", *images, "--checkpoint", run["ckpt"], "--beam-size", 3, "--attention-map", maps,
            "--device", "cpu", "--json")
    assert r.exit_code == 1  # one file failed ...
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "notes.jpg" in errors[0] and "cannot read as an image" in errors[0]
    rows = json.loads(r.stdout)  # ... and the others were still captioned
    assert [row["image"] for row in rows] == [str(p) for p in images]
    assert "error" in rows[1] and all("caption" in rows[i] for i in (0, 2, 3))
    for row in (rows[0], rows[2], rows[3]):
        png = Image.open(row["attention_map"])
        assert png.format == "PNG" and png.size == grid_size(len(row["words"]))
        assert row["caption"] == " ".join(row["words"]) and np.isfinite(row["score"])
    assert sorted(p.name for p in maps.iterdir()) == sorted(f"{p.stem}.png" for p in (images[0], images[2], images[3]))

    # the PNG of the photo: one tile per word, and the heat map moves from word to word
    row = rows[3]
    n = len(row["words"])
    assert n >= 2, row
    png = np.asarray(Image.open(row["attention_map"]).convert("RGB"))
    tiles = [png[t:b, le:ri] for le, t, ri, b in (tile_box(i, n_words=n) for i in range(n + 1))]
    assert len({tile.tobytes() for tile in tiles[1:]}) > 1
    assert all(not np.array_equal(tile, tiles[0]) for tile in tiles[1:])  # and differs from the plain photo


def test_captioner_attention_maps(run, captioner, tmp_path):
    ds = load_prepared(run["data"])
    paths = [ds.image_path(int(i)) for i in ds.split_image_ids("test")]
    results = captioner.caption(paths, beam_size=2)
    assert all(r.error is None and r.crop is not None and r.crop.size == (SIZE, SIZE) for r in results)
    for res in results:  # one (h, w) distribution per word over the 2 x 2 grid
        assert res.attention is not None and res.attention.shape == (len(res.words), 2, 2)
        np.testing.assert_allclose(res.attention.sum(axis=(1, 2)), 1.0, rtol=1e-4)
    (tmp_path / "empty.jpg").write_bytes(b"")
    missing, folder, empty = captioner.caption([run["root"] / "missing.jpg", run["root"], tmp_path / "empty.jpg"])
    assert missing.error is not None and "image file not found" in missing.error
    assert folder.error == f"{run['root']}: a folder, not an image file"
    assert empty.error == f"{tmp_path / 'empty.jpg'}: an empty file (0 bytes), not an image"


def test_captioner_refuses_a_huge_png_by_max_pixels_not_by_pils_limit(captioner, tmp_path, monkeypatch):
    """``captions caption huge.png``: the documented refusal, not PIL's decompression-bomb message."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # PIL's default, as in a fresh process
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_only(30000, 30000))  # 110 kB declaring 900 million pixels
    error = captioner.caption([huge])[0].error
    assert error is not None and "huge.png" in error, error
    assert "image refused (30000 x 30000 pixels: decoding 900,000,000 pixels exceeds --max-pixels 50,000,000)" \
        in error and "DecompressionBomb" not in error, error


def test_captioner_reruns_the_same_backbone(run, captioner):
    """Features the captioner computes for the prepared images equal the cached ones: same random
    weights, size and preprocessing."""
    ds = load_prepared(run["data"])
    ids = ds.split_image_ids("test")[:4]
    from captions.features.preprocess import preprocess_image
    from captions.pipeline.resize import load_rgb

    batch = torch.stack([preprocess_image(load_rgb(ds.image_path(int(i))), captioner.preprocessing) for i in ids])
    mine = captioner.features(batch).numpy()
    with FeatureCache(run["feats"]) as cache:
        cached = cache.spatial[ids]
    np.testing.assert_allclose(mine, cached, rtol=0.05, atol=0.05 * float(np.abs(cached).mean()))
    # one image at a time or four at once: same captions
    paths = [ds.image_path(int(i)) for i in ids]
    one = [r.caption for r in captioner.caption(paths, beam_size=2, batch_size=1)]
    four = [r.caption for r in captioner.caption(paths, beam_size=2, batch_size=4)]
    assert one == four


def test_caption_checks_the_weights_file(run, tmp_path):
    """A checkpoint whose features came from a state_dict file needs that file (sha256 checked)."""
    from torchvision.models import get_model

    torch.manual_seed(0)
    good = tmp_path / "resnet18.pth"
    torch.save(get_model("resnet18", weights=None).state_dict(), good)
    wrong = tmp_path / "other.pth"
    torch.manual_seed(1)
    torch.save(get_model("resnet18", weights=None).state_dict(), wrong)
    ckpt = load_checkpoint(run["ckpt"])
    ckpt["features"] = {**ckpt["features"], "weights": "sha256:" + sha256_file(good)}
    path = tmp_path / "file-weights.pt"
    save_checkpoint(path, {k: v for k, v in ckpt.items() if k not in ("format", "format_version")})
    img = load_prepared(run["data"]).image_path(0)

    r = cli("caption", img, "--checkpoint", path)
    assert r.exit_code == 1 and "pass that state_dict file with --weights" in r.output
    r = cli("caption", img, "--checkpoint", path, "--weights", wrong)
    assert r.exit_code == 1 and "is not the weights file" in r.output
    r = cli("caption", img, "--checkpoint", path, "--weights", good, "--beam-size", 1)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"{img}: ") and len(r.stdout.strip().splitlines()) == 1
    r = cli("caption", img, "--checkpoint", run["ckpt"], "--weights", good)  # random-init checkpoint
    assert r.exit_code == 1 and "randomly initialised" in r.output
    # evaluate without --features rebuilds the backbone the same way, from the same --weights
    ev = ["evaluate", path, "--data", run["data"], "--split", "val", "--beam-size", 1, "--out", tmp_path / "ev"]
    r = cli(*ev)
    assert r.exit_code == 1 and "pass that state_dict file with --weights" in r.output
    r = cli(*ev, "--weights", good)
    assert r.exit_code == 0 and "CIDEr" in r.output, r.output
    r = cli(*ev, "--weights", good, "--features", run["feats"])
    assert r.exit_code == 1 and "--weights applies only without --features" in r.output


def test_pooled_model_captions_and_refuses_attention_maps(run, tmp_path):
    cfg = TrainConfig.from_dict(dict(model="lstm", epochs=1, batch_size=32, embed_dim=16, hidden_dim=32, device="cpu"))
    train(run["data"], run["feats"], tmp_path / "lstm", cfg, progress=False)
    ckpt = tmp_path / "lstm" / "best.pt"
    img = load_prepared(run["data"]).image_path(0)
    captioner = Captioner.from_checkpoint(ckpt, device="cpu")
    (res,) = captioner.caption([Image.open(img)], beam_size=3)  # a PIL image works too
    assert res.error is None and res.attention is None and res.caption == " ".join(res.words)
    r = cli("caption", img, "--checkpoint", ckpt, "--attention-map", tmp_path / "maps")
    assert r.exit_code == 1 and "--attention-map needs an attention model" in r.output


def test_baseline_nn_retrieves_consensus_captions_of_neighbours(run, tmp_path, no_java):
    out = tmp_path / "nn"
    r = cli("baseline", "nn", "--data", run["data"], "--features", run["feats"], "--split", "val", "-k", 3,
            "--out", out, "--json")
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert record["model"] == "nn" and record["k"] == 3 and record["images"] == 8
    assert {"BLEU-4", "ROUGE-L", "CIDEr"} <= set(record["metrics"])
    assert json.loads((out / "metrics.json").read_text()) == record
    # each prediction is a training caption of one of the 3 nearest training images (cosine, pooled)
    ds = load_prepared(run["data"])
    with FeatureCache(run["feats"]) as cache:
        pooled = cache.pooled[:].astype(np.float64)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    train_ids = ds.split_image_ids("train")
    for p in json.loads((out / "predictions.json").read_text()):
        near = train_ids[np.argsort(-(pooled[train_ids] @ pooled[p["image_id"]]))[:3]]
        assert p["caption"] in {" ".join(t) for i in near for t in ds.images[i]["tokens"]}

    r = cli("baseline", "nn", "--data", run["data"], "--features", run["feats"], "--split", "nope")
    assert r.exit_code == 1 and "no images in split 'nope'" in r.output


def test_consensus_picks_the_caption_closest_to_the_others():
    from collections import Counter

    from captions.baseline import consensus, tfidf_vectors
    from captions.cider import ngram_counts

    caps = [["a", "red", "car"], ["a", "red", "car", "parked"], ["a", "blue", "boat"], ["red", "car"]]
    df = Counter(g for c in caps for g in set(ngram_counts(c)))
    assert consensus(tfidf_vectors(caps, df, len(caps))) in (0, 3)  # the "red car" family, not the outlier
    assert consensus(tfidf_vectors(caps, df, len(caps))) != 2


def test_attention_map_titles_draw_vietnamese_letters():
    from PIL import ImageDraw

    from captions.attention_maps import _font

    font = _font(20)
    if not hasattr(font, "path"):
        pytest.skip("no TrueType font with wide coverage on this machine")

    def ink(text):
        img = Image.new("L", (40, 30))
        ImageDraw.Draw(img).text((2, 2), text, font=font, fill=255)
        return np.asarray(img)

    # with a Latin-1-only font both letters come out as the same missing-glyph box
    assert not np.array_equal(ink("ư"), ink("ơ"))
    assert not np.array_equal(ink("đ"), ink("ạ"))


def test_an_incomplete_cache_is_refused_by_evaluate_and_train(run, tmp_path):
    """A cache marked complete with a chunk never written (before: evaluate scored the images it
    had and exited 0, train trained on rows of zeros)."""
    import shutil

    import h5py

    feats = tmp_path / "feats.h5"
    shutil.copy(run["feats"], feats)
    with h5py.File(feats, "r+") as f:
        f["chunks_done"][0] = False
    for args in (["evaluate", run["ckpt"], "--data", run["data"], "--features", feats, "--out", tmp_path / "eval"],
                 ["train", "attn", "--data", run["data"], "--features", feats, "--out", tmp_path / "run"]):
        r = cli(*args)
        assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
        assert r.output.startswith(f"Error: {feats}: feature cache is marked complete, yet 1 of 1 chunks")
    assert not (tmp_path / "eval").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_zero_byte_or_truncated_checkpoint_is_one_line(run, tmp_path, damage):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"" if damage == "empty" else run["ckpt"].read_bytes()[:5000])
    for args in (["evaluate", ckpt, "--data", run["data"], "--features", run["feats"], "--out", tmp_path / "eval"],
                 ["caption", run["data"] / "source" / "missing.jpg", "--checkpoint", ckpt]):
        r = cli(*args)
        assert r.exit_code == 1 and r.output.count("\n") == 1 and "Traceback" not in r.output, r.output
        reason = "an empty file" if damage == "empty" else "truncated or damaged"
        assert r.output.startswith(f"Error: {ckpt}: not a captions checkpoint ({reason}"), r.output
        assert "If you are seeing this error" not in r.output  # torch's advice paragraph is cut
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "last.pt").write_bytes(ckpt.read_bytes())
    r = cli("train", "attn", "--data", run["data"], "--features", run["feats"], "--out", resumed, "--resume")
    assert r.exit_code == 1 and r.output.startswith(f"Error: {resumed / 'last.pt'}: ") and r.output.count("\n") == 1, \
        r.output

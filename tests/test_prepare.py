import json
import logging
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from captions.cli import main
from captions.errors import CaptionsError
from captions.pipeline import resize as resize_mod
from captions.pipeline.prepare import PrepareOptions, prepare
from captions.pipeline.prepared import load_prepared
from captions.pipeline.resize import load_rgb
from tests.conftest import write_image

OPTS = PrepareOptions(min_count=1, image_size=32)


def make_csv(tmp_path, rows, header="image,caption,split"):
    path = tmp_path / "captions.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def csv_set(tmp_path):
    """4 images (2 train, 1 val, 1 test), 2 captions each."""
    for i in range(4):
        write_image(tmp_path / "images" / f"im{i}.jpg", seed=i)
    rows = [
        "im0.jpg,A red dog runs.,train", "im0.jpg,The red dog.,train",
        "im1.jpg,A blue cat sits,train", "im1.jpg,a cat,train",
        "im2.jpg,A zebra only in val,val", "im2.jpg,zebra,val",
        "im3.jpg,a dog,test", "im3.jpg,a red cat,test",
    ]
    return make_csv(tmp_path, rows)


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_prepare_csv_honours_splits_and_builds_train_vocab(tmp_path, csv_set):
    out = tmp_path / "out"
    manifest = prepare("csv", [csv_set], out, options=OPTS)
    assert manifest["counts"] == {"train": {"images": 2, "captions": 4}, "val": {"images": 1, "captions": 2},
                                  "test": {"images": 1, "captions": 2}}
    ds = load_prepared(out)
    assert "zebra" not in ds.vocab.token_to_idx  # val words never enter the vocabulary
    assert {"red", "dog", "cat", "blue"} <= set(ds.vocab.token_to_idx)
    assert ds.captions.shape == (8, OPTS.max_length + 2)
    assert [im["split"] for im in ds.images] == ["train", "train", "val", "test"]
    assert ds.references("val") == {2: ["a zebra only in val", "zebra"]}
    with Image.open(ds.image_path(0)) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    assert manifest["vocab_hash"] == ds.vocab.hash
    assert manifest["sources"][0]["sha256"]
    assert manifest["options"]["tokenizer"] == "simple"


def test_csv_without_split_column_hashes_deterministically(tmp_path):
    for i in range(30):
        write_image(tmp_path / "images" / f"im{i}.jpg", size=(8, 8), seed=i)
    csv = make_csv(tmp_path, [f"im{i}.jpg,a picture number {i}" for i in range(30)], header="image,caption")
    opts = PrepareOptions(min_count=1, image_size=16, val_fraction=0.2, test_fraction=0.2)
    m1 = prepare("csv", [csv], tmp_path / "a", options=opts)
    m2 = prepare("csv", [csv], tmp_path / "b", options=opts)
    assert m1["counts"] == m2["counts"]
    assert m1["counts"]["val"]["images"] > 0 and m1["counts"]["test"]["images"] > 0
    splits_a = [im["split"] for im in load_prepared(tmp_path / "a").images]
    assert splits_a == [im["split"] for im in load_prepared(tmp_path / "b").images]


def test_missing_and_corrupt_images_are_reported_skipped_and_counted(tmp_path, csv_set, caplog):
    (tmp_path / "images" / "im1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (tmp_path / "images" / "im3.jpg").read_bytes()
    (tmp_path / "images" / "im3.jpg").write_bytes(good[: len(good) // 3])  # truncated
    with open(csv_set, "a") as f:
        f.write("nothere.jpg,a ghost,train\n")
    manifest = prepare("csv", [csv_set], tmp_path / "out", options=OPTS)
    reasons = {s["image"]: s["reason"] for s in manifest["skipped"]}
    assert manifest["skipped_count"] == 3
    assert reasons["nothere.jpg"].startswith("image file not found")
    assert reasons["im1.jpg"].startswith("unreadable image")
    assert reasons["im3.jpg"].startswith("unreadable image")
    assert manifest["counts"]["train"]["images"] == 1
    assert "skipped nothere.jpg" in caplog.text


def test_empty_captions_are_dropped_and_counted(tmp_path, csv_set):
    with open(csv_set, "a") as f:
        f.write('im0.jpg,"   ",train\nim2.jpg,,val\n')
    manifest = prepare("csv", [csv_set], tmp_path / "out", options=OPTS)
    assert manifest["empty_captions"] == 2
    assert manifest["counts"]["train"]["captions"] == 4


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16"])
def test_any_image_mode_becomes_rgb(tmp_path, mode):
    suffix = ".tif" if mode in ("CMYK", "I;16") else ".png"
    if mode == "I;16":
        path = tmp_path / "x.png"
        Image.fromarray(np.full((10, 12), 40000, dtype=np.uint16)).save(path)
    else:
        path = write_image(tmp_path / f"x{suffix}", size=(12, 10), mode=mode)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (12, 10)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_rgb(tmp_path / "rot.jpg").size == (20, 40)


def test_rerun_is_a_noop(tmp_path, csv_set, caplog):
    out = tmp_path / "out"
    prepare("csv", [csv_set], out, options=OPTS)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    caplog.clear()
    caplog.set_level(logging.INFO, logger="captions")
    prepare("csv", [csv_set], out, options=OPTS)
    assert "nothing to do" in caplog.text
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_changed_options_reprepare(tmp_path, csv_set):
    out = tmp_path / "out"
    prepare("csv", [csv_set], out, options=OPTS)
    m = prepare("csv", [csv_set], out, options=PrepareOptions(min_count=2, image_size=32))
    assert m["options"]["min_count"] == 2
    assert "blue" not in load_prepared(out).vocab.token_to_idx


def test_interrupted_resize_resumes_without_redoing_finished_images(tmp_path, csv_set, monkeypatch):
    out = tmp_path / "out"
    real = resize_mod.resize_one
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(resize_mod, "resize_one", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare("csv", [csv_set], out, options=OPTS, workers=1)
    assert not (out / "manifest.json").exists()
    done = {p: p.stat().st_mtime_ns for p in (out / "images").glob("*.jpg")}
    assert len(done) == 2
    monkeypatch.setattr(resize_mod, "resize_one", real)
    prepare("csv", [csv_set], out, options=OPTS, workers=1)
    assert (out / "manifest.json").exists()
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())
    assert len(list((out / "images").glob("*.jpg"))) == 4
    assert not list(out.rglob(".*tmp*"))


# ------------------------------------------------------------------------------------- bad input, via CLI
def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    for frag in fragments:
        assert frag in lines[0], lines[0]


def test_cli_missing_source_file(tmp_path):
    r = run_cli("prepare", "coco", tmp_path / "nope.json", "--out", tmp_path / "out")
    assert_one_line_error(r, "nope.json", "source file not found")


def test_cli_malformed_json(tmp_path):
    bad = tmp_path / "captions_train2017.json"
    bad.write_text('{"images": [ {"id": 1,, }')
    r = run_cli("prepare", "coco", bad, "--out", tmp_path / "out")
    assert_one_line_error(r, "captions_train2017.json", "malformed JSON at line 1")
    assert not (tmp_path / "out" / "manifest.json").exists()
    bad_k = tmp_path / "dataset_x.json"
    bad_k.write_text("[1, 2")
    assert_one_line_error(run_cli("prepare", "karpathy", bad_k, "--out", tmp_path / "o2"), "dataset_x.json")


def test_cli_csv_without_needed_columns(tmp_path):
    csv = make_csv(tmp_path, ["a.jpg,train"], header="filename,split")
    assert_one_line_error(run_cli("prepare", "csv", csv, "--out", tmp_path / "out"),
                          "captions.csv", "lacks column(s) image, caption")


def test_cli_unknown_tokenizer(tmp_path, csv_set):
    r = run_cli("prepare", "csv", csv_set, "--out", tmp_path / "out", "--tokenizer", "nope")  # bpe is one now
    assert_one_line_error(r, "unknown tokenizer 'nope'")


def test_cli_refuses_out_of_another_format_version(tmp_path, csv_set):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "captions-prepared", "format_version": 99}))
    r = run_cli("prepare", "csv", csv_set, "--out", out)
    assert_one_line_error(r, "manifest.json", "format version 99")
    assert json.loads((out / "manifest.json").read_text())["format_version"] == 99  # untouched


def test_load_prepared_refuses_incomplete_directory(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(CaptionsError, match="no manifest.json"):
        load_prepared(tmp_path / "half")


def test_cli_prepare_summary(tmp_path, csv_set):
    r = run_cli("prepare", "csv", csv_set, "--out", tmp_path / "out", "--min-count", "1", "--image-size", "24",
                "--quiet")
    assert r.exit_code == 0, r.output
    assert "train 2 images / 4 captions" in r.output
    assert os.path.exists(tmp_path / "out" / "manifest.json")


def test_flickr8k_kaggle_captions_txt_uses_hash_split(tmp_path):
    for i in range(12):
        write_image(tmp_path / "Images" / f"{i}.jpg", size=(20, 20), seed=i)
    txt = tmp_path / "captions.txt"
    txt.write_text("image,caption\n" + "".join(f"{i}.jpg,A dog number {i} runs .\n{i}.jpg,a dog\n" for i in range(12)))
    m = prepare("flickr8k", [txt], tmp_path / "out",
                options=PrepareOptions(min_count=1, image_size=16, val_fraction=0.25, test_fraction=0.25))
    assert sum(c["images"] for c in m["counts"].values()) == 12 and m["skipped_count"] == 0
    assert m["counts"]["train"]["captions"] == 2 * m["counts"]["train"]["images"]

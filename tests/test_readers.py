"""Real-world annotation files (issue 17): hand-made and spreadsheet-edited COCO, Karpathy, Flickr8k
and CSV files are read, or refused with one line naming the file, the entry and the key; every
caption read is kept or counted as dropped with its reason; re-runs notice changed source images;
huge and thin images cost nothing."""

from __future__ import annotations

import copy
import json
import os
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from benchmarks.serve_load import png_header_only
from captions.cli import main
from captions.data.splits import hash_split
from captions.pipeline.prepare import PrepareOptions, prepare
from captions.pipeline.prepared import load_prepared
from captions.pipeline.resize import ImageRefused, load_rgb
from tests.conftest import write_image

OPTS = PrepareOptions(min_count=1, image_size=16)


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result, *fragments):
    """The single ``Error:`` line of a command that exited 1 (and printed no traceback)."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


def adds_up(m):
    """Every caption read is kept or dropped with a reason, and the kept ones are the split counts."""
    assert m["captions_read"] == m["captions_kept"] + sum(m["captions_dropped"].values()), m
    assert m["captions_kept"] == sum(c["captions"] for c in m["counts"].values())


@pytest.fixture
def images(tmp_path):
    for i in range(3):
        write_image(tmp_path / "images" / f"{i}.jpg", size=(20, 20), seed=i)
    return tmp_path / "images"


COCO = {"info": {}, "licenses": [],
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 20, "height": 20} for i in range(3)],
        "annotations": [{"id": 10 * i + k, "image_id": i, "caption": f"A dog number {i} runs {k}."}
                        for i in range(3) for k in range(2)]}


def write_coco(tmp_path, doc, name="captions_train2017.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- COCO
def test_coco_written_by_other_tools_reads_every_caption(tmp_path, images):
    doc = copy.deepcopy(COCO)
    for a in doc["annotations"]:
        del a["id"]  # no annotation ids
    doc["categories"] = [{"id": 1, "name": "dog", "supercategory": "animal"}]  # as in instance files
    for im in doc["images"]:
        im["id"] = str(im["id"])  # string ids in images, integers in annotations
    doc["annotations"].append({"image_id": 7, "caption": "an image nobody listed"})
    m = prepare("coco", [write_coco(tmp_path, doc)], tmp_path / "out", images=images, options=OPTS)
    assert m["counts"]["train"] == {"images": 3, "captions": 6}
    assert m["captions_dropped"] == {"annotation names an image id not in 'images'": 1}
    adds_up(m)


@pytest.mark.parametrize("change, fragments", [
    (lambda d: d["images"][1].pop("file_name"), ["images[1] lacks 'file_name'"]),
    (lambda d: d["images"][2].pop("id"), ["images[2] lacks 'id'"]),
    (lambda d: d.update(images={"a": 1}), ["'images' must be an array, got an object"]),
    (lambda d: d.update(images=[1, 2]), ["images[0] must be an object, got an integer"]),
    (lambda d: d["images"][0].update(file_name=5), ["images[0] 'file_name' must be a string, got an integer"]),
    (lambda d: d.update(annotations="captions"), ["'annotations' must be an array, got a string"]),
    (lambda d: d["annotations"][3].pop("caption"), ["annotations[3] lacks 'caption'"]),
    (lambda d: d["images"][2].update(id=0), ["images[2] repeats the id 0 of images[0]"]),
])
def test_coco_structural_faults_are_one_line_naming_entry_and_key(tmp_path, images, change, fragments):
    doc = copy.deepcopy(COCO)
    change(doc)
    r = run_cli("prepare", "coco", write_coco(tmp_path, doc), "--out", tmp_path / "out", "--images", images)
    one_error_line(r, "captions_train2017.json", *fragments)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_coco_two_ids_with_one_file_name_and_an_image_without_annotations(tmp_path, images):
    doc = copy.deepcopy(COCO)
    doc["images"].append({"id": 5, "file_name": "1.jpg"})  # another id for 1.jpg, with captions of its own
    doc["annotations"] += [{"image_id": 5, "caption": f"a different picture {k}"} for k in range(3)]
    doc["images"].append({"id": 6, "file_name": "9.jpg"})  # no annotation at all
    m = prepare("coco", [write_coco(tmp_path, doc)], tmp_path / "out", images=images, options=OPTS)
    assert m["counts"]["train"] == {"images": 3, "captions": 6}  # 1.jpg keeps the first id's captions only
    assert m["skipped"] == [
        {"image": "1.jpg", "reason": "image id 5 (images[3]) has the file_name of image id 1 (images[1]); "
                                     "its 3 caption(s) dropped"},
        {"image": "9.jpg", "reason": "no caption"}]
    assert m["skipped_count"] == 2 and m["captions_dropped"] == {"image skipped": 3}
    adds_up(m)
    assert load_prepared(tmp_path / "out").images[1]["captions"] == ["A dog number 1 runs 0.", "A dog number 1 runs 1."]


# ------------------------------------------------------------------------------------------------ Karpathy
def test_karpathy_with_a_bom_and_plain_string_sentences(tmp_path, images):
    doc = {"images": [{"filename": f"{i}.jpg", "split": "train" if i < 2 else "val",
                       "sentences": [f"a cat number {i}", {"raw": "A dog.", "tokens": ["a", "dog"]},
                                     {"tokens": ["a", "red", "bird"]}]} for i in range(3)]}
    src = tmp_path / "dataset_x.json"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode("utf-8"))
    m = prepare("karpathy", [src], tmp_path / "out", images=images, options=OPTS)
    assert m["counts"]["train"] == {"images": 2, "captions": 6} and m["counts"]["val"]["captions"] == 3
    ds = load_prepared(tmp_path / "out")
    assert ds.images[0]["captions"] == ["a cat number 0", "A dog.", "a red bird"]
    adds_up(m)


@pytest.mark.parametrize("change, fragments", [
    (lambda d: d["images"][1]["sentences"].append({"imgid": 1}), ["images[1] sentences[1] has neither 'raw' nor "
                                                                   "'tokens'"]),
    (lambda d: d["images"].__setitem__(0, "0.jpg"), ["images[0] must be an object, got a string"]),
    (lambda d: d["images"][1].update(split="training"), ["images[1] 'split' is 'training'"]),
    (lambda d: d["images"][1]["sentences"][0].update(tokens="a dog"), ["images[1] sentences[0] 'tokens' must be "
                                                                        "an array"]),
])
def test_karpathy_structural_faults_are_one_line(tmp_path, images, change, fragments):
    doc = {"images": [{"filename": f"{i}.jpg", "split": "train", "sentences": [{"tokens": ["a", "dog"]}]}
                      for i in range(3)]}
    change(doc)
    src = tmp_path / "dataset_x.json"
    src.write_text(json.dumps(doc))
    one_error_line(run_cli("prepare", "karpathy", src, "--out", tmp_path / "out", "--images", images),
                   "dataset_x.json", *fragments)


# ------------------------------------------------------------------------------------------------ Flickr8k
def write_flickr(folder, header: bool = False, encoding: str = "utf-8", bom: bool = False):
    """Token file (3 images, 2 captions each, with accents) and the three split lists."""
    lines = ["image_id\tcaptions"] if header else []
    lines += [f"{i}.jpg#{k}\tUn café près du lac numéro {i}" for i in range(3) for k in range(2)]
    mark = b"\xef\xbb\xbf" if bom else b""
    token = folder / "Flickr8k.token.txt"
    token.write_bytes(mark + "\n".join(lines).encode(encoding) + b"\n")
    for name, names in (("train", ["0.jpg", "1.jpg"]), ("dev", ["2.jpg"]), ("test", [])):
        (folder / f"Flickr_8k.{name}Images.txt").write_bytes(mark + "".join(f"{n}\n" for n in names).encode())
    return token


@pytest.mark.parametrize("header, bom", [(True, False), (False, True), (True, True)])
def test_flickr8k_header_and_bom_lose_nothing(tmp_path, images, header, bom):
    token = write_flickr(tmp_path, header=header, bom=bom)
    m = prepare("flickr8k", [token], tmp_path / "out", images=images, options=OPTS)
    assert m["counts"]["train"] == {"images": 2, "captions": 4} and m["counts"]["val"] == {"images": 1, "captions": 2}
    assert m["skipped_count"] == 0 and m["captions_read"] == 6
    assert sorted(im["name"] for im in load_prepared(tmp_path / "out").images) == ["0.jpg", "1.jpg", "2.jpg"]


@pytest.mark.parametrize("encoding", ["cp1252", "latin-1"])
def test_flickr8k_in_a_legacy_encoding_is_one_line_or_read_with_encoding(tmp_path, images, encoding):
    token = write_flickr(tmp_path, encoding=encoding)
    r = run_cli("prepare", "flickr8k", token, "--out", tmp_path / "out", "--images", images)
    one_error_line(r, "Flickr8k.token.txt", "line 1, column 15: byte 0xe9 is not valid UTF-8", "--encoding")
    r = run_cli("prepare", "flickr8k", token, "--out", tmp_path / "out", "--images", images, "--encoding", encoding,
                "--min-count", 1, "--quiet", "--workers", 1)
    assert r.exit_code == 0, r.output
    assert load_prepared(tmp_path / "out").images[0]["captions"][0] == "Un café près du lac numéro 0"


# ----------------------------------------------------------------------------------------------------- CSV
def test_csv_from_a_spreadsheet_with_bom_blank_lines_and_a_nameless_row(tmp_path, images):
    text = "\ufeffImage,Caption,Split\n\n0.jpg,a red dog,train\n,a caption without image,train\n" \
           "1.jpg,\"a dog, running\",train\n\n2.jpg,a cat,val\n"
    src = tmp_path / "captions.csv"
    src.write_text(text, encoding="utf-8")
    m = prepare("csv", [src], tmp_path / "out", images=images, options=OPTS)
    assert m["counts"]["train"] == {"images": 2, "captions": 2} and m["counts"]["val"]["images"] == 1
    assert m["captions_dropped"] == {"row without an image name": 1}
    adds_up(m)
    src.write_text("image,caption\n0.jpg,a dog, running\n")
    one_error_line(run_cli("prepare", "csv", src, "--out", tmp_path / "o2"), "captions.csv",
                   "line 2 has 3 fields, the header 2")


# ----------------------------------------------------------------------------- one image in two splits
def two_split_sources(fmt, folder):
    """Sources of each reader naming 0.jpg (2 captions) in train and again in val (1 caption, except
    for Flickr8k, whose captions are not per split); 1.jpg in train, 2.jpg in val."""
    if fmt == "coco":
        files = []
        for split, names in (("train", ["0.jpg", "1.jpg"]), ("val", ["2.jpg", "0.jpg"])):
            doc = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
                   "annotations": [{"image_id": i, "caption": f"a {split} dog {k}"}
                                   for i in range(2) for k in range(2 if (split, i) != ("val", 1) else 1)]}
            files.append(write_coco(folder, doc, f"captions_{split}2017.json"))
        return files
    if fmt == "karpathy":
        doc = {"images": [{"filename": n, "split": sp, "sentences": ["a dog"] * k}
                          for n, sp, k in (("0.jpg", "train", 2), ("1.jpg", "train", 2), ("2.jpg", "val", 2),
                                           ("0.jpg", "val", 1))]}
        (folder / "dataset_x.json").write_text(json.dumps(doc))
        return [folder / "dataset_x.json"]
    if fmt == "csv":
        rows = ["0.jpg,a dog,train", "1.jpg,a cat,train", "0.jpg,a dog again,train", "2.jpg,a bird,val",
                "1.jpg,a cat again,train", "2.jpg,a bird again,val", "0.jpg,a dog in val,val"]
        (folder / "captions.csv").write_text("image,caption,split\n" + "\n".join(rows) + "\n")
        return [folder / "captions.csv"]
    token = write_flickr(folder)
    (folder / "Flickr_8k.devImages.txt").write_text("2.jpg\n0.jpg\n")  # 0.jpg is in the train list too
    return [token]


@pytest.mark.parametrize("fmt", ["coco", "karpathy", "csv", "flickr8k"])
def test_an_image_named_in_two_splits_is_kept_in_the_first_and_skipped_in_the_other(tmp_path, images, fmt):
    m = prepare(fmt, two_split_sources(fmt, tmp_path), tmp_path / "out", images=images, options=OPTS)
    assert m["skipped"] == [{"image": "0.jpg", "reason": "named again in split 'val' (first in 'train')"}]
    assert m["counts"]["train"] == {"images": 2, "captions": 4} and m["counts"]["val"] == {"images": 1, "captions": 2}
    assert m["captions_dropped"] == ({} if fmt == "flickr8k" else {"image skipped": 1})  # Flickr8k: none per split
    adds_up(m)
    assert {im["name"]: im["split"] for im in load_prepared(tmp_path / "out").images} == {
        "0.jpg": "train", "1.jpg": "train", "2.jpg": "val"}


def test_kaggle_captions_and_split_lists_naming_an_image_twice(tmp_path, images):
    (tmp_path / "captions.txt").write_text("image,caption\n" + "".join(f"{i}.jpg,a dog {i}\n" for i in range(3)))
    write_flickr(tmp_path)
    (tmp_path / "Flickr_8k.testImages.txt").write_text("1.jpg\n")
    m = prepare("flickr8k", [tmp_path / "captions.txt"], tmp_path / "out", images=images, options=OPTS)
    assert m["skipped"] == [{"image": "1.jpg", "reason": "named again in split 'test' (first in 'train')"}]
    assert m["counts"]["train"]["images"] == 2 and m["counts"]["test"]["images"] == 0


def test_csv_blank_split_cell_means_hash_split_and_an_unknown_split_lists_the_names(tmp_path, images):
    src = tmp_path / "captions.csv"
    src.write_text("image,caption,split\n0.jpg,a dog,train\n1.jpg,a cat,\n2.jpg,a bird\n")  # blank, short
    m = prepare("csv", [src], tmp_path / "out", images=images,
                options=PrepareOptions(min_count=1, image_size=16, val_fraction=0.0, test_fraction=0.0))
    assert m["counts"]["train"] == {"images": 3, "captions": 3} and m["skipped"] == []
    splits = {im["name"]: im["split"] for im in load_prepared(tmp_path / "out").images}
    assert splits == {"0.jpg": "train", "1.jpg": "train", "2.jpg": "train"}  # hash split with 0 val, 0 test
    src.write_text("image,caption,split\n0.jpg,a dog,train\n1.jpg,a cat,Training\n")
    line = one_error_line(run_cli("prepare", "csv", src, "--out", tmp_path / "o2"), "captions.csv",
                          "line 3: unknown split 'Training' (accepted: train, restval (= train), val, dev (= val), "
                          "valid (= val), test")
    assert "(" + "'train'" not in line


def test_no_training_image_says_why(tmp_path, images):
    name = next(f"{i}.jpg" for i in range(100) if hash_split(f"{i}.jpg") != "train")  # deterministic
    write_image(images / name, size=(20, 20))
    src = tmp_path / "captions.txt"  # Kaggle Flickr8k: no split column, no lists: the hash split
    src.write_text(f"image,caption\n{name},a dog runs\n")
    line = one_error_line(run_cli("prepare", "flickr8k", src, "--out", tmp_path / "out", "--images", images),
                          "captions.txt", f"no usable training images: all 1 usable image(s) are in "
                          f"{hash_split(name)} (1), by the hash split of their names (--val-fraction 0.05, "
                          "--test-fraction 0.05)")
    assert "skipped" not in line and "see the messages above" not in line
    src.write_text("image,caption,split\n0.jpg,a dog,val\n1.jpg,a cat,test\n5.jpg,a bird,train\n")
    line = one_error_line(run_cli("prepare", "csv", src, "--out", tmp_path / "o2", "--images", images),
                          "no usable training images: all 2 usable image(s) are in val (1) and test (1); "
                          "1 image(s) skipped (see the messages above)")
    assert "hash" not in line


# --------------------------------------------------------------------------------- captions without words
def test_captions_without_words_are_dropped_and_counted(tmp_path, images):
    rows = ["0.jpg,a red dog,train", "0.jpg,!!!,train", "0.jpg,😀 😀,train", "1.jpg,a cat,train",
            "2.jpg,...,val", "2.jpg,   ,val"]
    src = tmp_path / "captions.csv"
    src.write_text("image,caption,split\n" + "\n".join(rows) + "\n", encoding="utf-8")
    m = prepare("csv", [src], tmp_path / "out", images=images, options=OPTS)
    assert m["counts"]["train"] == {"images": 2, "captions": 2}
    assert m["empty_captions"] == 4 and m["captions_dropped"] == {"empty": 1, "no words": 3}
    assert m["skipped"] == [{"image": "2.jpg", "reason": "no caption with a word"}]
    adds_up(m)
    ds = load_prepared(tmp_path / "out")
    assert all(row[1] != 2 for row in ds.captions)  # no caption is <START> <END>


# ---------------------------------------------------------------------------------------------- re-runs
def test_rerun_notices_other_images_folder_and_repaired_images(tmp_path, images):
    src = tmp_path / "captions.csv"
    src.write_text("image,caption,split\n0.jpg,a dog,train\n1.jpg,a cat,train\n2.jpg,a bird,val\n")
    (images / "2.jpg").write_bytes(b"not an image")
    m = prepare("csv", [src], tmp_path / "out", images=images, options=OPTS)
    assert [s["image"] for s in m["skipped"]] == ["2.jpg"]

    write_image(images / "2.jpg", size=(20, 20), seed=2)  # repaired
    m = prepare("csv", [src], tmp_path / "out", images=images, options=OPTS)
    assert m["skipped"] == [] and m["counts"]["val"]["images"] == 1

    other = tmp_path / "other"
    other.mkdir()
    for i in range(3):  # same names, other pictures: plain colours
        Image.new("RGB", (20, 20), (40 * i, 200, 90)).save(other / f"{i}.jpg")
    m = prepare("csv", [src], tmp_path / "out", images=other, options=OPTS)
    ds = load_prepared(tmp_path / "out")
    for i in range(3):
        resized = np.asarray(Image.open(ds.image_path(i)), dtype=float)
        assert np.abs(resized - np.array([40 * i, 200, 90])).max() < 8  # made from the new folder's file


# ---------------------------------------------------------------------------------------- huge and thin
def test_a_huge_thin_png_costs_nothing_and_large_jpegs_decode_reduced(tmp_path, images):
    Image.new("RGB", (20000, 1), (255, 0, 0)).save(images / "strip.png")  # 141 bytes
    Image.new("RGB", (120, 100), (0, 0, 255)).save(images / "big.png")
    write_image(images / "photo.jpg", size=(400, 320), seed=5)  # decodes at 1/8: 50 x 40 pixels
    wide = np.zeros((30, 120, 3), dtype=np.uint8)
    wide[:, 45:75] = 255  # a white centre square on black
    Image.fromarray(wide).save(images / "wide.png")
    rows = [f"{n},a picture,train" for n in ("0.jpg", "strip.png", "big.png", "photo.jpg", "wide.png")]
    src = tmp_path / "captions.csv"
    src.write_text("image,caption,split\n" + "\n".join(rows) + "\n")
    t0 = time.perf_counter()
    m = prepare("csv", [src], tmp_path / "out", images=images, workers=1,
                options=PrepareOptions(min_count=1, image_size=16, max_pixels=10_000))
    assert time.perf_counter() - t0 < 5
    reasons = {s["image"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"strip.png", "big.png"}
    assert "aspect ratio over 20:1" in reasons["strip.png"] and reasons["strip.png"].startswith("image refused")
    assert "decoding 12,000 pixels exceeds --max-pixels 10,000" in reasons["big.png"]
    ds = load_prepared(tmp_path / "out")
    centre = next(i for i, im in enumerate(ds.images) if im["name"] == "wide.png")
    assert np.asarray(Image.open(ds.image_path(centre))).min() > 230  # the crop is the centre square only



def test_max_pixels_alone_decides_not_pils_own_limit(tmp_path, images, monkeypatch):
    """PIL refuses images over twice its ``MAX_IMAGE_PIXELS`` (about 179 million pixels by default)
    at open, with its own message; the package's ``--max-pixels`` must decide in both directions."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's limit far below --max-pixels (here 400 > 2 x 100)
    src = tmp_path / "captions.csv"
    src.write_text("image,caption,split\n0.jpg,a dog,train\n1.jpg,a cat,train\n")
    m = prepare("csv", [src], tmp_path / "out", images=images, workers=1, options=OPTS)
    assert m["skipped"] == [] and m["counts"]["train"]["images"] == 2
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # PIL's default, below this PNG's pixels
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_only(30000, 30000))  # 110 kB
    with pytest.raises(ImageRefused, match="decoding 900,000,000 pixels exceeds --max-pixels 50,000,000"):
        load_rgb(huge)


# ------------------------------------------------------------------------------------------- synthetic
def test_prepare_synthetic_checks_first_and_writes_nothing(tmp_path):
    r = run_cli("prepare", "synthetic", "--out", tmp_path / "s", "--num-images", "10,-1,2")
    assert r.exit_code == 2 and "Invalid value for '--num-images'" in r.output
    out = tmp_path / "old"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "captions-prepared", "format_version": 99}))
    one_error_line(run_cli("prepare", "synthetic", "--out", out, "--num-images", "4,1,1"), "format version 99")
    assert sorted(os.listdir(out)) == ["manifest.json"]

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

from captions.cli import main
from captions.pipeline.prepare import PrepareOptions, prepare
from captions.pipeline.prepared import load_prepared
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


# ------------------------------------------------------------------------------------------- synthetic
def test_prepare_synthetic_checks_first_and_writes_nothing(tmp_path):
    r = run_cli("prepare", "synthetic", "--out", tmp_path / "s", "--num-images", "10,-1,2")
    assert r.exit_code == 2 and "Invalid value for '--num-images'" in r.output
    out = tmp_path / "old"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "captions-prepared", "format_version": 99}))
    one_error_line(run_cli("prepare", "synthetic", "--out", out, "--num-images", "4,1,1"), "format version 99")
    assert sorted(os.listdir(out)) == ["manifest.json"]

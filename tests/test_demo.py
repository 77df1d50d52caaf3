"""``captions demo`` on a tiny setting, the attention-grid renderer, and the demo's report helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from captions import metrics
from captions.attention_maps import attention_grid, grid_size, heat_overlay, jet, save_attention_grid, tile_box
from captions.cli import main
from captions.demo import MARKER, attribute_accuracy, shuffled_baseline


def photo(size: int = 96) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def test_jet_runs_blue_to_red():
    c = jet(np.array([0.0, 0.5, 1.0]))
    assert c.dtype == np.uint8 and c.shape == (3, 3)
    assert c[0, 2] > c[0, 0] and c[2, 0] > c[2, 2]  # low = blue, high = red
    assert c[1, 1] == 255  # middle = green


def test_attention_grid_size_and_tiles_differ_between_words(tmp_path):
    words = ["a", "red", "circle", "in", "the", "top", "left", "corner"]
    maps = np.zeros((len(words), 3, 3), dtype=np.float32)
    for i in range(len(words)):  # each word looks at another cell
        maps[i].flat[i % 9] = 1.0
    path = save_attention_grid(tmp_path / "grid.png", photo(), words, maps)
    img = Image.open(path)
    assert img.format == "PNG" and img.size == grid_size(len(words))
    width, height = grid_size(len(words))
    assert (width, height) == (4 * 192, 26 + 3 * (22 + 192))  # 9 tiles in rows of 4
    arr = np.asarray(img.convert("RGB"))
    tiles = [arr[t:b, le:r] for le, t, r, b in (tile_box(i) for i in range(len(words) + 1))]
    assert len({t.tobytes() for t in tiles}) == len(tiles)  # photo + 8 different heat maps
    # the hottest pixel of word i's tile lies in the cell it attended to
    for i in range(len(words)):
        red = tiles[i + 1][..., 0].astype(int) - tiles[i + 1][..., 2].astype(int)
        y, x = np.unravel_index(np.argmax(red), red.shape)
        assert (y * 3 // 192, x * 3 // 192) == divmod(i % 9, 3)
    # a title strip above each tile holds the word (dark pixels on white)
    strip = arr[26 : 26 + 22, 192 : 2 * 192]
    assert (strip < 100).any() and (strip == 255).mean() > 0.5


def test_attention_grid_short_captions_and_bad_maps():
    img = attention_grid(photo(), ["hi"], np.ones((1, 2, 2)))
    assert img.size == grid_size(1) == (2 * 192, 26 + 22 + 192)
    assert attention_grid(photo(), [], np.zeros((0, 2, 2))).size == grid_size(0)
    uniform = np.asarray(heat_overlay(photo(), np.full((2, 2), 0.25)))
    assert uniform.shape == (96, 96, 3)
    with pytest.raises(ValueError, match="maps must be"):
        attention_grid(photo(), ["a", "b"], np.ones((1, 2, 2)))


def test_attribute_accuracy_and_shuffled_baseline():
    images = [{"tokens": [["a", "tiny", "red", "circle", "in", "the", "top", "left", "corner"]]},
              {"tokens": [["a", "big", "blue", "square", "in", "the", "center"]]}]
    preds = {0: "there is a little red triangle at the top left corner", 1: "a huge blue square in the center"}
    acc = attribute_accuracy(images, preds)
    assert acc == {"colour": 1.0, "shape": 0.5, "size": 1.0, "position": 1.0, "all": 0.5}
    refs = {i: [" ".join(im["tokens"][0])] for i, im in enumerate(images)}
    exact = {i: r[0] for i, r in refs.items()}
    assert shuffled_baseline(refs, exact)["BLEU-4"] < 0.5  # each image gets the other's caption


def test_demo_tiny_run(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)  # no 5-10 s Java start for METEOR
    out = tmp_path / "demo"
    r = CliRunner().invoke(main, ["demo", "--out", str(out), "--num-images", "16,4,4", "--epochs", "1",
                                  "--image-size", "64", "--hidden-dim", "16", "--embed-dim", "8", "--samples", "2",
                                  "--weights", "none", "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["test"]["images"] == 4 and "BLEU-4" in report["test"]["metrics"]
    assert report["weights"] == "random initialisation" and report["spatial_grid"] == [2, 2]
    pngs = sorted((out / "attention").glob("*.png"))
    assert len(pngs) == 2 and all(s["attention_map"] for s in report["samples"])
    assert "BLEU-4" in r.stdout and "sample test captions" in r.stdout and str(out / "attention") in r.stdout
    assert (out / "report.txt").read_text().strip() == r.stdout.strip()
    assert (out / MARKER).exists()
    assert set(report["attributes"]) == {"colour", "shape", "size", "position", "all"}

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    r = CliRunner().invoke(main, ["demo", "--out", str(foreign), "--weights", "none"])
    assert r.exit_code == 1 and "not made by 'captions demo'" in r.output
    assert (foreign / "precious.txt").read_text() == "keep me"

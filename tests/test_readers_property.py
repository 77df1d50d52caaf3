"""Property (issue 17): whatever is done to a valid COCO, Karpathy, Flickr8k or CSV file (keys
deleted, values of the wrong type, other encodings, byte-order marks, blank and header lines),
``captions prepare`` either succeeds with captions that add up (read = kept + dropped with a
reason) or exits 1 with exactly one ``Error:`` line naming the file; never a traceback."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from captions.cli import main
from tests.conftest import write_image

N_IMAGES = 3
CAPTIONS = ("A dog runs on the grass.", "Một người đang đứng", "a café, two birds")
SPLIT_LIST_NAMES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
                    "test": "Flickr_8k.testImages.txt"}
WRONG = st.one_of(st.none(), st.booleans(), st.integers(-2, 50), st.text(max_size=6),
                  st.lists(st.integers(0, 3), max_size=2), st.just({}))
ENCODINGS = ("utf-8", "utf-8-sig", "utf-16", "cp1252", "latin-1")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(N_IMAGES):
        write_image(folder / f"{i}.jpg", size=(12, 12), seed=i)
    return folder


def valid_json(fmt: str) -> dict:
    if fmt == "coco":
        return {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 12, "height": 12} for i in range(N_IMAGES)],
                "annotations": [{"id": 10 * i + k, "image_id": i, "caption": c}
                                for i in range(N_IMAGES) for k, c in enumerate(CAPTIONS)]}
    return {"images": [{"filepath": "", "filename": f"{i}.jpg", "split": "train" if i else "val",
                        "sentences": [{"raw": c, "tokens": c.lower().split()} for c in CAPTIONS]}
                       for i in range(N_IMAGES)]}


def valid_lines(fmt: str) -> list[str]:
    if fmt == "flickr8k":
        return [f"{i}.jpg#{k}\t{c}" for i in range(N_IMAGES) for k, c in enumerate(CAPTIONS)]
    return ["image,caption,split"] + [f'{i}.jpg,"{c}",{"train" if i else "val"}'
                                      for i in range(N_IMAGES) for c in CAPTIONS]


def mutate_json(data: st.DataObject, doc: dict) -> dict:
    """Delete keys or put values of the wrong type at places drawn anywhere in ``doc``."""
    for _ in range(data.draw(st.integers(0, 3), label="mutations")):
        parent, key, node = None, None, doc
        while isinstance(node, dict | list) and node and (key is None or data.draw(st.booleans())):
            keys = sorted(node) if isinstance(node, dict) else list(range(len(node)))
            parent, key = node, data.draw(st.sampled_from(keys))
            node = node[key]
        if parent is None:
            continue
        if data.draw(st.booleans(), label="delete"):
            del parent[key]
        else:
            parent[key] = data.draw(WRONG, label="value")
    return doc


def mutate_lines(data: st.DataObject, lines: list[str], header: str) -> list[str]:
    """Insert blank or header lines, drop a separator, or cut a line short."""
    lines = list(lines)
    for _ in range(data.draw(st.integers(0, 3), label="mutations")):
        at = data.draw(st.integers(0, len(lines)), label="at")
        kind = data.draw(st.sampled_from(["blank", "header", "no separator", "cut"]), label="kind")
        if kind == "blank":
            lines.insert(at, data.draw(st.sampled_from(["", "   ", "\t"])))
        elif kind == "header":
            lines.insert(at, header)
        elif lines and at < len(lines):
            line = lines[at]
            cut = line[: len(line) // 2]
            lines[at] = line.replace("\t", " ").replace(",", " ", 1) if kind == "no separator" else cut
    return lines


def encoded(data: st.DataObject, text: str) -> bytes:
    """``text`` in an encoding drawn from ``ENCODINGS`` (unencodable letters become '?')."""
    return text.encode(data.draw(st.sampled_from(ENCODINGS), label="encoding"), errors="replace")


def write_sources(data: st.DataObject, fmt: str, folder: Path) -> list[Path]:
    if fmt in ("coco", "karpathy"):
        path = folder / ("captions_train2017.json" if fmt == "coco" else "dataset_x.json")
        path.write_bytes(encoded(data, json.dumps(mutate_json(data, valid_json(fmt)), ensure_ascii=False)))
        return [path]
    header = "image_id\tcaptions" if fmt == "flickr8k" else "image,caption,split"
    path = folder / ("Flickr8k.token.txt" if fmt == "flickr8k" else "captions.csv")
    path.write_bytes(encoded(data, "\n".join(mutate_lines(data, valid_lines(fmt), header)) + "\n"))
    if fmt == "flickr8k":
        for split, name in SPLIT_LIST_NAMES.items():
            names = {"train": ["1.jpg", "2.jpg"], "dev": ["0.jpg"], "test": []}[split]
            (folder / name).write_bytes(encoded(data, "\n".join(mutate_lines(data, names, "")) + "\n"))
    return [path]


@pytest.mark.parametrize("fmt", ["coco", "karpathy", "flickr8k", "csv"])
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_sources_prepare_or_fail_in_one_line(images, fmt, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sources = write_sources(data, fmt, folder)
        r = CliRunner().invoke(main, ["prepare", fmt, *map(str, sources), "--out", str(folder / "out"),
                                      "--images", str(images), "--min-count", "1", "--image-size", "16",
                                      "--workers", "1", "--quiet"])
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        assert "Traceback" not in r.output
        event(f"exit {r.exit_code}")  # pytest --hypothesis-show-statistics: how often each outcome was seen
        if r.exit_code == 0:
            m = json.loads((folder / "out" / "manifest.json").read_text(encoding="utf-8"))
            assert m["captions_read"] == m["captions_kept"] + sum(m["captions_dropped"].values()), m
            assert m["captions_kept"] == sum(c["captions"] for c in m["counts"].values())
        else:
            assert r.exit_code == 1, r.output
            errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
            assert len(errors) == 1, r.output
            assert any(p.name in errors[0] for p in folder.iterdir()), errors[0]

"""Shared fixtures: tiny synthetic data made in the test, and the optional ../shared folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared() -> Path:
    """The team's ../shared folder; tests using it skip with a reason when it is absent."""
    if not (SHARED / "README.md").exists():
        pytest.skip(f"../shared not found at {SHARED} (real data and weights live there)")
    return SHARED


def write_image(path: Path, size: tuple[int, int] = (40, 30), mode: str = "RGB", seed: int = 0) -> Path:
    """Write a random image of ``size`` and ``mode`` (format from the suffix); returns ``path``."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def cli(*args: object):
    """Run the ``captions`` command line in-process (click's runner), arguments as strings."""
    from click.testing import CliRunner

    from captions.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def cli_run(root: Path, num_images: str, size: int, model: str, *train_args: object) -> dict:
    """prepare synthetic -> extract-features (resnet18, random weights, float32) -> train MODEL
    through the command line, as a user would; asserts each step succeeds."""
    data, feats, run = root / "data", root / "feats.h5", root / "run"
    r = cli("prepare", "synthetic", "--out", data, "--num-images", num_images, "--image-size", size, "--min-count", 1,
            "--workers", 1, "--quiet")
    assert r.exit_code == 0, r.output
    r = cli("extract-features", data, "--out", feats, "--backbone", "resnet18", "--weights", "none", "--image-size",
            size, "--dtype", "float32", "--workers", 0, "--batch-size", 16, "--quiet")
    assert r.exit_code == 0, r.output
    r = cli("train", model, "--data", data, "--features", feats, "--out", run, "--device", "cpu", "--scst-epochs", 0,
            "--quiet", *train_args)
    assert r.exit_code == 0, r.output
    return {"root": root, "data": data, "feats": feats, "run": run, "ckpt": run / "best.pt", "train_output": r.output}


@pytest.fixture
def no_java(monkeypatch):
    """METEOR starts a Java process (5-10 s): the fast tests score without it."""
    from captions import metrics

    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    monkeypatch.setattr(metrics, "_warned_java", False)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """40/8/8 synthetic images prepared at 64 px with resnet18 (random, seeded) features: 2x2
    positions. Module-scoped: each test module gets its own (prepared dataset dir, cache path)."""
    from captions.features.extract import ExtractOptions, extract_features
    from captions.pipeline.prepare import PrepareOptions, prepare_synthetic

    root = tmp_path_factory.mktemp("synth")
    prepare_synthetic(root / "prep", 40, 8, 8, workers=1, progress=False,
                      options=PrepareOptions(min_count=1, image_size=64))
    cache = extract_features(root / "prep", root / "f.h5",
                             ExtractOptions(backbone="resnet18", weights="none", image_size=64, workers=0),
                             progress=False)
    return root / "prep", cache


@pytest.fixture
def server():
    """``tests.test_download.FakeServer`` (an HTTP server on 127.0.0.1) running in a thread."""
    import threading

    from tests.test_download import FakeServer

    srv = FakeServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()

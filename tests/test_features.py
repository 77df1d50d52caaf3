import json
import logging
import os
import signal
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from captions.cli import main
from captions.errors import CaptionsError
from captions.features.backbones import build_backbone
from captions.features.cache import FeatureCache
from captions.features.extract import ExtractOptions, extract_features
from captions.features.spec import FeatureSpec
from captions.pipeline.prepare import PrepareOptions, prepare
from captions.pipeline.prepared import load_prepared
from tests.conftest import write_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_prepared(root, n=10, size=64):
    """A prepared dataset of ``n`` random images (3/4 train) resized to ``size``."""
    rows = []
    for i in range(n):
        write_image(root / "raw" / "images" / f"im{i:03d}.png", size=(50 + i, 40), seed=i)
        split = "train" if i % 4 else "val"
        rows += [f"im{i:03d}.png,a picture with {i % 3} things,{split}", f"im{i:03d}.png,another view,{split}"]
    csv = root / "raw" / "captions.csv"
    csv.write_text("image,caption,split\n" + "\n".join(rows) + "\n")
    prepare("csv", [csv], root / "prep", options=PrepareOptions(min_count=1, image_size=size), progress=False)
    return root / "prep"


def seeded_weights(tmp_path, name, seed=0):
    """Random weights for ``name`` saved as a state_dict file, so two builds share them."""
    torch.manual_seed(seed)
    model = build_backbone(name, "none").module
    inner = model.model if name.startswith("timm/") else None
    if inner is None:  # torchvision: rebuild the full classifier so the file is a normal state_dict
        from torchvision.models import get_model

        torch.manual_seed(seed)
        full = get_model(name, weights=None)
    else:
        full = inner
    path = tmp_path / f"{name.replace('/', '_')}.pth"
    torch.save(full.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("feat"))


def reference_forward(prepared_dir, weights, name, image_size, ids):
    """Independent reference: torchvision transforms on the stored JPEG, then the backbone."""
    from torchvision import transforms as T

    bb = build_backbone(name, str(weights), image_size)
    p = bb.preprocessing
    interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[p.interpolation]
    tf = T.Compose([T.Resize(p.resize, interpolation=interp), T.CenterCrop(p.crop), T.ToTensor(),
                    T.Normalize(p.mean, p.std)])
    ds = load_prepared(prepared_dir)
    x = torch.stack([tf(Image.open(ds.image_path(i)).convert("RGB")) for i in ids])
    with torch.inference_mode():
        fmap = bb.module(x)
    return fmap.flatten(2).transpose(1, 2).numpy(), fmap.mean(dim=(2, 3)).numpy()


@pytest.mark.parametrize("name", ["resnet18", "timm/tf_efficientnet_lite0"])
def test_cache_rows_equal_direct_forward(tmp_path, prepared, name):
    weights = seeded_weights(tmp_path, name)
    opts = ExtractOptions(backbone=name, weights=str(weights), image_size=64, dtype="float16", batch_size=3,
                          workers=0, precision="fp32")
    path = extract_features(prepared, tmp_path / "c.h5", opts, progress=False)
    with FeatureCache(path) as cache:
        assert cache.metadata["backbone"] == name
        assert cache.metadata["weights"].startswith("sha256:")
        assert cache.metadata["dataset_hash"] == load_prepared(prepared).dataset_hash
        assert cache.names == [im["name"] for im in load_prepared(prepared).images]
        ids = [0, 4, 9]
        sp_ref, po_ref = reference_forward(prepared, weights, name, 64, ids)
        sp, po = cache.spatial[ids].astype(np.float32), cache.pooled[ids].astype(np.float32)
        assert sp.shape == (3, cache.num_positions, cache.channels)
        scale = np.abs(sp_ref).max()
        np.testing.assert_allclose(sp, sp_ref, rtol=2e-3, atol=2e-3 * scale)  # float16 storage
        np.testing.assert_allclose(po, po_ref, rtol=2e-3, atol=2e-3 * np.abs(po_ref).max())


def test_bf16_precision_stays_close(tmp_path, prepared):
    weights = seeded_weights(tmp_path, "resnet18")
    opts = ExtractOptions(backbone="resnet18", weights=str(weights), image_size=64, workers=0, precision="bf16")
    with FeatureCache(extract_features(prepared, tmp_path / "c.h5", opts, progress=False)) as cache:
        _, po_ref = reference_forward(prepared, weights, "resnet18", 64, range(10))
        err = np.linalg.norm(cache.pooled[:].astype(np.float32) - po_ref) / np.linalg.norm(po_ref)
        assert err < 0.03


def test_existing_cache_is_reused_or_refused(tmp_path, prepared, caplog):
    out = tmp_path / "c.h5"
    base = ExtractOptions(backbone="resnet18", weights="none", image_size=32, workers=0)
    extract_features(prepared, out, base, progress=False)
    before = out.stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger="captions")
    extract_features(prepared, out, base, progress=False)
    assert "already complete" in caplog.text and out.stat().st_mtime_ns == before
    for change in (dict(backbone="resnet34"), dict(image_size=64), dict(dtype="float32")):
        with pytest.raises(CaptionsError, match="exists with other settings"):
            extract_features(prepared, out, ExtractOptions(**{**base.__dict__, **change}), progress=False)
    assert out.stat().st_mtime_ns == before


def test_cache_of_another_dataset_is_refused(tmp_path, prepared):
    path = extract_features(prepared, tmp_path / "c.h5",
                            ExtractOptions(backbone="resnet18", weights="none", image_size=32, workers=0),
                            progress=False)
    with FeatureCache(path) as cache:
        cache.check_dataset(load_prepared(prepared).dataset_hash)
        with pytest.raises(CaptionsError, match="different prepared dataset"):
            cache.check_dataset("0" * 64)


def test_cache_spec_and_arrays(tmp_path, prepared):
    opts = ExtractOptions(backbone="resnet18", weights="none", image_size=32, workers=0, chunk_rows=4)
    path = extract_features(prepared, tmp_path / "c.h5", opts, progress=False)
    bb = build_backbone("resnet18", "none", 32)
    expected = FeatureSpec(backbone="resnet18", weights="random", image_size=32,
                           preprocessing=bb.preprocessing.to_dict(), dtype="float16", precision="auto",
                           spatial_shape=(1, 1), channels=512, dataset_hash=load_prepared(prepared).dataset_hash)
    with FeatureCache(path) as cache, FeatureCache(path, in_memory=True) as ram:
        assert cache.spec == expected and cache.metadata["token_layout"] == "grid"
        assert cache.chunk_rows == 4
        assert cache.array("spatial") is cache.spatial and cache.array("pooled") is cache.pooled
        assert cache.array("spatial").shape == (10, 1, 512) and cache.array("pooled").shape == (10, 512)
        assert isinstance(ram.array("pooled"), np.ndarray)
        with pytest.raises(ValueError, match="spatial or pooled"):
            cache.array("both")
    import h5py

    with h5py.File(path, "r+") as f:  # as written before token_layout and chunk_rows were recorded
        del f.attrs["token_layout"], f.attrs["chunk_rows"]
    with FeatureCache(path) as cache:
        assert cache.spec == expected and cache.chunk_rows == 256


def test_corrupt_image_is_reported_skipped_and_marked(tmp_path, caplog):
    prep = make_prepared(tmp_path, n=6, size=32)
    ds = load_prepared(prep)
    ds.image_path(2).write_bytes(b"garbage")
    path = extract_features(prep, tmp_path / "c.h5",
                            ExtractOptions(backbone="resnet18", weights="none", image_size=32, workers=0),
                            progress=False)
    assert "unreadable image" in caplog.text
    with FeatureCache(path) as cache:
        assert cache.valid.tolist() == [True, True, False, True, True, True]
        assert cache.skipped[0]["image"] == ds.images[2]["name"]
        assert [row for row, *_ in cache.torch_dataset()] == [0, 1, 3, 4, 5]


def test_cli_errors_are_one_clear_line(tmp_path, prepared, monkeypatch):
    r = CliRunner().invoke(main, ["extract-features", str(prepared), "--backbone", "vgg99"])
    assert r.exit_code == 1 and "unknown backbone 'vgg99'; valid backbones: regnet_x_400mf" in r.output
    wrong = seeded_weights(tmp_path, "resnet18")
    r = CliRunner().invoke(main, ["extract-features", str(prepared), "--backbone", "resnet34", "--weights", str(wrong)])
    assert r.exit_code == 1 and "does not fit backbone resnet34: missing keys" in r.output

    def offline(*a, **k):  # the network edge: what torch.hub sees with no internet
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    r = CliRunner().invoke(main, ["extract-features", str(prepared), "--out", str(tmp_path / "x.h5")])
    assert r.exit_code == 1
    assert "--weights PATH" in r.output and "--weights none" in r.output
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_torch_dataset_in_dataloader_workers(tmp_path, prepared, start_method):
    path = extract_features(prepared, tmp_path / "c.h5",
                            ExtractOptions(backbone="resnet18", weights="none", image_size=32, workers=0),
                            progress=False)
    with FeatureCache(path) as cache, FeatureCache(path, in_memory=True) as ram:
        loader = torch.utils.data.DataLoader(cache.torch_dataset(), batch_size=4, num_workers=2,
                                             multiprocessing_context=start_method)
        rows, sp, po = (torch.cat(t) for t in zip(*loader, strict=True))
        assert rows.tolist() == list(range(10))
        np.testing.assert_array_equal(sp.numpy(), ram.spatial.astype(np.float32))
        np.testing.assert_array_equal(po.numpy(), ram.pooled.astype(np.float32))
        assert isinstance(ram.spatial, np.ndarray)


def run_cli_subprocess(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "captions", *args], cwd=REPO, env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, **kw)


def test_killed_extraction_resumes_without_recomputing(tmp_path, caplog):
    prep = make_prepared(tmp_path, n=40, size=32)
    weights = seeded_weights(tmp_path, "resnet18")
    out = tmp_path / "c.h5"
    args = ["-v", "extract-features", str(prep), "--backbone", "resnet18", "--weights", str(weights),
            "--image-size", "32", "--chunk-rows", "4", "--batch-size", "2", "--workers", "0", "--quiet",
            "--out", str(out), "--precision", "fp32"]
    proc = run_cli_subprocess(args)
    written = 0
    for line in proc.stderr:
        if line.startswith("chunks "):
            written += 1
            if written == 3:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists()  # only the .partial file: never mistaken for a complete cache
    caplog.set_level(logging.INFO, logger="captions")
    extract_features(prep, out, ExtractOptions(backbone="resnet18", weights=str(weights), image_size=32,
                                               chunk_rows=4, batch_size=2, workers=0, precision="fp32"),
                     progress=False)
    done = int(caplog.text.split("resuming c.h5.partial.h5: ")[1].split(" of")[0])
    assert done >= 3
    fresh = extract_features(prep, tmp_path / "fresh.h5",
                             ExtractOptions(backbone="resnet18", weights=str(weights), image_size=32, workers=0,
                                            precision="fp32"), progress=False)
    with FeatureCache(out) as a, FeatureCache(fresh) as b:
        assert a.valid.all()
        np.testing.assert_allclose(a.pooled[:].astype(np.float32), b.pooled[:].astype(np.float32), rtol=1e-3,
                                   atol=1e-3)


def test_torchrun_two_ranks_make_one_cache(tmp_path):
    prep = make_prepared(tmp_path, n=12, size=32)
    weights = seeded_weights(tmp_path, "resnet18")
    out = tmp_path / "dist.h5"
    common = ["--backbone", "resnet18", "--weights", str(weights), "--image-size", "32", "--chunk-rows", "2",
              "--workers", "0", "--quiet", "--precision", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "captions", "extract-features", str(prep), "--out", str(out), *common],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("dist*")) == ["dist.h5"]  # shards merged and removed
    single = extract_features(prep, tmp_path / "single.h5",
                              ExtractOptions(backbone="resnet18", weights=str(weights), image_size=32, workers=0,
                                             precision="fp32"), progress=False)
    with FeatureCache(out) as a, FeatureCache(single) as b:
        assert a.valid.all() and json.dumps(a.skipped) == "[]"
        np.testing.assert_allclose(a.spatial[:].astype(np.float32), b.spatial[:].astype(np.float32), rtol=1e-3,
                                   atol=1e-3)


def test_out_in_a_new_folder_is_created(tmp_path, prepared):
    out = tmp_path / "new" / "deeper" / "c.h5"
    extract_features(prepared, out, ExtractOptions(backbone="resnet18", weights="none", image_size=32, workers=0),
                     progress=False)
    with FeatureCache(out) as cache:
        assert cache.valid.all()


def test_a_cache_marked_complete_with_chunks_never_written_is_refused_then_finished(tmp_path, prepared, caplog):
    """complete=True while a /chunks_done flag is False (the rows were never written): the reader
    refuses it in one line, and extract-features re-checks the chunks and writes the missing one
    instead of saying 'already complete'."""
    import h5py

    opts = ExtractOptions(backbone="resnet18", weights="none", image_size=32, workers=0, chunk_rows=4)
    out = extract_features(prepared, tmp_path / "c.h5", opts, progress=False)
    with FeatureCache(out, in_memory=True) as cache:
        spatial, pooled = cache.spatial, cache.pooled
    with h5py.File(out, "r+") as f:
        f["chunks_done"][1] = False
        f["spatial"][4:8] = 0
        f["pooled"][4:8] = 0
    with pytest.raises(CaptionsError, match=r"c\.h5: feature cache is marked complete, yet 1 of 3 chunks were never "
                                            r"written; re-run 'captions extract-features'"):
        FeatureCache(out)
    caplog.set_level(logging.INFO, logger="captions")
    extract_features(prepared, out, opts, progress=False)
    assert "already complete" not in caplog.text and "1 chunk(s) were never written; extracting them" in caplog.text
    assert "resuming c.h5.partial.h5: 2 of 3 chunks already done" in caplog.text
    with FeatureCache(out) as cache:
        np.testing.assert_array_equal(cache.spatial[:], spatial)
        np.testing.assert_array_equal(cache.pooled[:], pooled)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["c.h5"]


def test_a_second_extraction_into_the_same_cache_is_refused_in_one_line(tmp_path, prepared):
    from captions.fsutil import output_lock

    out = tmp_path / "c.h5"
    with output_lock(tmp_path / ".c.h5.lock", "extract-features"):
        r = CliRunner().invoke(main, ["extract-features", str(prepared), "--out", str(out), "--backbone", "resnet18",
                                      "--weights", "none", "--image-size", "32", "--workers", "0", "--quiet"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert f"another 'captions extract-features' (pid {os.getpid()} on " in r.output
    assert f"holds {tmp_path / '.c.h5.lock'}" in r.output and not out.exists()


def test_a_cache_whose_arrays_do_not_fit_together_is_refused_by_reader_and_extraction(tmp_path, prepared):
    """A complete-looking cache edited by another tool (a row missing, chunk flags deleted) is
    refused in one line by the reader and by a re-run of extract-features, never used."""
    import h5py

    opts = ExtractOptions(backbone="resnet18", weights="none", image_size=32, workers=0, chunk_rows=4)
    out = extract_features(prepared, tmp_path / "c.h5", opts, progress=False)
    with h5py.File(out, "r+") as f:
        pooled = f["pooled"][:-1]
        del f["pooled"]
        f.create_dataset("pooled", data=pooled)
    with pytest.raises(CaptionsError, match=r"c\.h5: damaged feature cache \(\d+ image ids but \d+ pooled rows\)"):
        FeatureCache(out)
    with pytest.raises(CaptionsError, match=r"c\.h5: is marked complete but damaged"):
        extract_features(prepared, out, opts, progress=False)
    out2 = extract_features(prepared, tmp_path / "d.h5", opts, progress=False)
    with h5py.File(out2, "r+") as f:
        del f["chunks_done"]
    with pytest.raises(CaptionsError, match=r"d\.h5: damaged feature cache \(dataset\(s\) chunks_done missing\)"):
        FeatureCache(out2)

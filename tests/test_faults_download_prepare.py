"""Faults in ``captions download`` and ``captions prepare`` (issue #18): a kill at every write
boundary resumes to the result of an uninterrupted run; a full or read-only disk gives one line
and nothing final; two writers never mix; killed workers do not outlive their parent; an
archive's links never write outside its folder.

Kills go through the ``CAPTIONS_FAULT`` hook (``captions.fsutil.fault_point``): a forked child
runs the stage and ends with ``os._exit`` at the chosen boundary (no clean-up runs, as after
SIGKILL); one case per stage goes through the real command line in a subprocess.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captions import fsutil
from captions.fsutil import FAULT_ENV, FAULT_EXIT, FAULT_TRACE_ENV, folder_lock
from captions.pipeline import download as dl
from captions.pipeline.download import download_dataset
from captions.pipeline.prepare import PrepareOptions, prepare
from tests.conftest import cli, write_image
from tests.test_download import FAST, make_zip, sha

OPTS = PrepareOptions(min_count=1, image_size=32)
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers
def killed_at(point: str, run: Callable[[], object]) -> int:
    """Run ``run`` in a forked child with ``CAPTIONS_FAULT=point``; returns its exit status
    (``FAULT_EXIT`` when the hook ended it there, 0 when it finished, 2 when it raised)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: forking beside the server thread
        pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 2
        try:
            os.environ[FAULT_ENV] = point
            os.environ.pop(FAULT_TRACE_ENV, None)
            fsutil._fault_counts.clear()
            logging.disable(logging.CRITICAL)
            run()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def traced(monkeypatch, tmp_path: Path, run: Callable[[], object], stage: str) -> list[str]:
    """The write boundaries ``stage:boundary:N`` an uninterrupted ``run`` passes, in order."""
    trace = tmp_path / f"trace-{stage}.txt"
    monkeypatch.setenv(FAULT_TRACE_ENV, str(trace))
    monkeypatch.setattr(fsutil, "_fault_counts", {})
    run()
    monkeypatch.delenv(FAULT_TRACE_ENV)
    return [p for p in trace.read_text().split() if p.startswith(stage + ":")]


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: file bytes, "dir", or "link -> target" (a link is a finding)."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = f"link -> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def fully_decodes(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return path.read_bytes().endswith(b"\xff\xd9")
    except OSError:
        return False


def one_error_line(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


def csv_set(root: Path, n: int = 4, size: tuple[int, int] = (48, 40)) -> Path:
    """``n`` images (train, then one val and one test) with two captions each, as a csv."""
    splits = ["val", "test"] + ["train"] * (n - 2)
    rows = []
    for i in range(n):
        write_image(root / "images" / f"im{i}.jpg", size=size, seed=i)
        rows += [f"im{i}.jpg,a red dog number {i},{splits[i]}", f"im{i}.jpg,the cat sits {i % 2},{splits[i]}"]
    path = root / "captions.csv"
    path.write_text("image,caption,split\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def same_prepared(ref: Path, out: Path) -> None:
    """``out`` holds what the uninterrupted run wrote into ``ref``: every file, byte for byte (the
    manifest up to its creation time), and nothing else (no temporary file, no truncated image)."""
    a, b = tree(ref), tree(out)
    ma, mb = (json.loads(t.pop("manifest.json")) for t in (a, b))
    ma.pop("created"), mb.pop("created")
    assert ma == mb
    za, zb = (np.load(io.BytesIO(t.pop("captions.npz"))) for t in (a, b))  # zip entries carry a timestamp
    assert all(np.array_equal(za[k], zb[k]) for k in ("captions", "image_ids"))
    assert a == b


# ------------------------------------------------------------------------------------------ prepare: kills
def test_prepare_killed_at_every_write_boundary_resumes_to_the_same_result(tmp_path, monkeypatch):
    csv = csv_set(tmp_path / "src")
    ref = tmp_path / "ref"

    def run(out: Path) -> Callable[[], object]:
        return lambda: prepare("csv", [csv], out, options=OPTS, workers=1, progress=False)

    points = traced(monkeypatch, tmp_path, run(ref), "prepare")
    kinds = {p.rsplit(":", 1)[0] for p in points}
    assert kinds == {f"prepare:{b}" for b in ("sources", "image-tmp", "image", "annotations", "captions", "vocab",
                                               "manifest-tmp", "manifest")}, points
    assert len(points) == 14  # 4 images, two boundaries each
    for point in points:
        out = tmp_path / point.replace(":", "_")
        assert killed_at(point, run(out)) == FAULT_EXIT, point
        assert (out / "manifest.json").exists() == (point == "prepare:manifest:1"), point
        assert all(fully_decodes(p) for p in (out / "images").glob("*.jpg")), point
        run(out)()
        same_prepared(ref, out)


def test_prepare_killed_through_the_command_line_resumes(tmp_path, monkeypatch):
    csv = csv_set(tmp_path / "src")
    args = ["prepare", "csv", csv, "--workers", "1", "--min-count", "1", "--image-size", "32", "--quiet"]
    assert cli(*args, "--out", tmp_path / "ref").exit_code == 0
    env = {**os.environ, FAULT_ENV: "prepare:image:3"}
    proc = subprocess.run([sys.executable, "-m", "captions", *map(str, args), "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, cwd=ROOT, timeout=120)
    assert proc.returncode == FAULT_EXIT, proc.stderr.decode()
    assert len(list((tmp_path / "out" / "images").glob("*.jpg"))) == 3
    resumed = cli(*args, "--out", tmp_path / "out")
    assert resumed.exit_code == 0, resumed.output
    same_prepared(tmp_path / "ref", tmp_path / "out")


def test_a_truncated_image_under_its_final_name_is_redone(tmp_path):
    csv = csv_set(tmp_path / "src")
    out = tmp_path / "out"
    prepare("csv", [csv], tmp_path / "ref", options=OPTS, workers=1, progress=False)
    prepare("csv", [csv], out, options=OPTS, workers=1, progress=False)
    (out / "manifest.json").unlink()  # an unfinished run, as a crash after a short write would leave it
    victim = sorted((out / "images").glob("*.jpg"))[1]
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) - 300])  # the header (size, comment) is intact: only a decode tells
    prepare("csv", [csv], out, options=OPTS, workers=1, progress=False)
    assert victim.read_bytes() == whole
    same_prepared(tmp_path / "ref", out)


# ------------------------------------------------------------------------------------------ prepare: workers
def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(d.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_killed_prepare_leaves_no_worker_running(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (4000, 3000), (200, 30, 30)).save(images / "im0.png", compress_level=1)  # ~0.2 s to decode
    for i in range(1, 16):
        shutil.copyfile(images / "im0.png", images / f"im{i}.png")
    csv = tmp_path / "c.csv"
    csv.write_text("image,caption,split\n" + "".join(f"im{i}.png,a red picture {i},train\n" for i in range(16)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "captions", "prepare", "csv", str(csv), "--out", str(out),
                             "--workers", "2", "--min-count", "1", "--image-size", "32", "--quiet"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and not list(out.glob("images/*.jpg")) and time.monotonic() < deadline:
            time.sleep(0.02)  # until the workers are at work
        kids = _children(proc.pid)
        assert proc.poll() is None and len(kids) >= 2, "prepare finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        while any(_alive(k) for k in kids) and time.monotonic() - killed < 5:
            time.sleep(0.05)
        left = [k for k in kids if _alive(k)]
        assert not left, f"{len(left)} of {len(kids)} worker/helper processes still run 5 s after the kill"
    finally:
        for k in [proc.pid, *kids] if proc.poll() is None else kids:
            if _alive(k):
                os.kill(k, signal.SIGKILL)


# ------------------------------------------------------------------------------------------ download: kills
def pack() -> bytes:
    rng = np.random.default_rng(0)
    return make_zip({f"pack/m{i}.bin": rng.integers(0, 256, 40_000, dtype=np.uint8).tobytes() for i in range(3)})


def test_download_killed_at_every_write_boundary_resumes_to_the_same_result(server, tmp_path, monkeypatch):
    blob = pack()
    server.files["/pack.zip"] = blob
    items = [(server.url + "/pack.zip", "pack.zip", None)]  # no checksum: the member list is what is checked

    def run(dest: Path) -> Callable[[], object]:
        return lambda: download_dataset(items, dest, **FAST)

    points = traced(monkeypatch, tmp_path, run(tmp_path / "ref"), "download")
    kinds = {p.rsplit(":", 1)[0] for p in points}
    assert kinds == {f"download:{b}" for b in ("part", "archive-tmp", "archive", "member-tmp", "member",
                                                "marker-tmp", "marker")}, points
    points = [p for p in points if not p.startswith("download:part:") or p == "download:part:1"]  # chunking varies
    ref = tree(tmp_path / "ref")
    assert ref["archives/pack.zip"] == blob and len([k for k in ref if k.startswith("pack/m")]) == 3
    for point in points:
        dest = tmp_path / point.replace(":", "_")
        assert killed_at(point, run(dest)) == FAULT_EXIT, point
        assert (dest / ".captions-download" / "pack.zip.done").exists() == (point == "download:marker:1"), point
        report = run(dest)()
        assert report.already_complete == (point == "download:marker:1")
        assert tree(dest) == ref, point


def test_download_killed_through_the_command_line_resumes(server, tmp_path):
    base = "/jbrownlee/Datasets/releases/download/Flickr8k"
    server.files[f"{base}/Flickr8k_Dataset.zip"] = make_zip({f"Flicker8k_Dataset/{i}.jpg": b"x" * 5000
                                                              for i in range(3)})
    server.files[f"{base}/Flickr8k_text.zip"] = make_zip({"Flickr8k.token.txt": b"0.jpg#0\ta dog\n"})
    args = ["download", "flickr8k", "--mirror", server.url, "--quiet", "--retry-delay", "0"]
    assert cli(*args, "--dest", tmp_path / "ref").exit_code == 0
    env = {**os.environ, FAULT_ENV: "download:member:2"}
    proc = subprocess.run([sys.executable, "-m", "captions", *args, "--dest", str(tmp_path / "d")], env=env,
                          capture_output=True, cwd=ROOT, timeout=120)
    assert proc.returncode == FAULT_EXIT, proc.stderr.decode()
    resumed = cli(*args, "--dest", tmp_path / "d")
    assert resumed.exit_code == 0, resumed.output
    assert tree(tmp_path / "d") == tree(tmp_path / "ref")


# ------------------------------------------------------------------------------------------ security
def _link(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def test_symlink_chain_zip_writes_nothing_outside_dest(server, tmp_path, monkeypatch):
    # each link looks inside DEST when it is checked; together they lead two levels up, through a link
    # named like the temporary file of the last member (the old extractor wrote ../../pwned, exit 0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(*_link("e", "x/.."))
        zf.writestr(*_link(".evil.extracting", "e/pwned"))
        zf.writestr(*_link("x", "y/.."))
        zf.writestr(*_link("y", "."))
        zf.writestr("evil", b"pwned!")
    blob = buf.getvalue()
    server.files["/zips/val2014.zip"] = blob
    monkeypatch.setitem(dl.CHECKSUMS, "val2014.zip", (len(blob), sha(blob)))
    dest = tmp_path / "a" / "b" / "dest"
    result = cli("download", "coco", "--what", "val", "--dest", dest, "--mirror", server.url, "--quiet")
    one_error_line(result, "val2014.zip", "refusing to extract member 'e': a symbolic link")
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "a").rglob("*")) == [
        "a/b", "a/b/dest", "a/b/dest/.download.lock", "a/b/dest/archives", "a/b/dest/archives/val2014.zip"]
    assert not any(p.is_symlink() for p in tmp_path.rglob("*"))


# ------------------------------------------------------------------------------------------ locks
def _hold(folder: Path, stage: str) -> subprocess.Popen:
    """Another process holding ``folder``'s lock for ``stage`` until its stdin closes."""
    code = ("import sys; from captions.fsutil import folder_lock\n"
            f"with folder_lock({str(folder)!r}, {stage!r}):\n    print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout.readline().strip() == b"held"
    return proc


def test_a_second_prepare_or_download_is_refused_naming_the_lock_and_its_holder(server, tmp_path):
    csv = csv_set(tmp_path / "src")
    out, dest = tmp_path / "out", tmp_path / "dest"
    server.files["/pack.zip"] = make_zip({"x.txt": b"x"})
    for stage, folder in (("prepare", out), ("download", dest)):
        holder = _hold(folder, stage)
        try:
            if stage == "prepare":
                result = cli("prepare", "csv", csv, "--out", out, "--workers", "1", "--min-count", "1", "--quiet")
            else:
                result = cli("download", "flickr8k", "--dest", dest, "--mirror", server.url, "--quiet")
            one_error_line(result, f"another 'captions {stage}' (pid {holder.pid} on ", str(folder / f".{stage}.lock"))
        finally:
            holder.stdin.close()
            holder.wait(timeout=30)
        assert not (folder / "manifest.json").exists() and not (folder / "archives").exists()
    result = cli("prepare", "csv", csv, "--out", out, "--workers", "1", "--min-count", "1", "--quiet")
    assert result.exit_code == 0, result.output  # the lock went with its holder
    with folder_lock(dest, "download"):  # and is held by this process now: refused in-process too
        with pytest.raises(Exception, match=r"\.download\.lock"):
            download_dataset([(server.url + "/pack.zip", "pack.zip", None)], dest, **FAST)


# ------------------------------------------------------------------------------------------ full and read-only disks
def test_enospc_while_prepare_writes_an_image_is_one_line_and_nothing_final(tmp_path, monkeypatch):
    csv = csv_set(tmp_path / "src")
    out = tmp_path / "out"
    monkeypatch.setattr(fsutil, "_fault_counts", {})
    monkeypatch.setenv(FAULT_ENV, "prepare:image-tmp:2:enospc")  # the 2nd image's bytes do not fit
    result = cli("prepare", "csv", csv, "--out", out, "--workers", "1", "--min-count", "1", "--image-size", "32")
    line = one_error_line(result, "No space left on device")
    assert f"{out / 'images'}/" in line and line.rstrip().endswith(".jpg: No space left on device")
    assert not (out / "manifest.json").exists()
    assert len(list((out / "images").glob("*.jpg"))) == 1 and not list(out.rglob(".*tmp*"))
    monkeypatch.delenv(FAULT_ENV)
    assert cli("prepare", "csv", csv, "--out", out, "--workers", "1", "--min-count", "1", "--image-size", "32",
               "--quiet").exit_code == 0


@pytest.mark.parametrize("point,where", [("download:part:1:enospc", "archives/val2014.zip.part"),
                                         ("download:member-tmp:2:enospc", "pack/m1.bin"),
                                         ("download:marker-tmp:1:enospc", ".captions-download/val2014.zip.done")])
def test_enospc_while_download_writes_is_one_line_and_nothing_final(server, tmp_path, monkeypatch, point, where):
    server.files["/zips/val2014.zip"] = blob = pack()
    monkeypatch.setitem(dl.CHECKSUMS, "val2014.zip", (len(blob), sha(blob)))
    monkeypatch.setattr(fsutil, "_fault_counts", {})
    monkeypatch.setenv(FAULT_ENV, point)
    dest = tmp_path / "d"
    result = cli("download", "coco", "--what", "val", "--dest", dest, "--mirror", server.url, "--quiet")
    one_error_line(result, f"{dest / where}: No space left on device")
    assert not list(dest.glob(".captions-download/*"))
    assert not list(dest.rglob("*.extracting")) and not list(dest.rglob(".*.tmp-*"))
    assert len(server.requests) == 1  # a full disk is not retried


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command (the injected-ENOSPC tests cover this)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the injected-ENOSPC tests cover this")


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, options): a small tmpfs under tmp_path (skips where this user cannot mount one)."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        _mount_tmpfs(tmp_path / name, options)
        mounted.append(tmp_path / name)
        return tmp_path / name

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_prepare_on_a_full_tmpfs_fails_in_one_line_then_resumes(tmp_path, tmpfs):
    csv = csv_set(tmp_path / "src", n=12, size=(96, 96))
    args = ["prepare", "csv", csv, "--workers", "1", "--min-count", "1", "--image-size", "64", "--quiet"]
    assert cli(*args, "--out", tmp_path / "ref").exit_code == 0
    out = tmpfs("full", "size=48k") / "out"  # room for a few resized images, not twelve
    one_error_line(cli(*args, "--out", out), f"{out}", "No space left on device")
    assert not (out / "manifest.json").exists()
    images = list((out / "images").glob("*.jpg"))
    assert 0 < len(images) < 12 and all(fully_decodes(p) for p in images)  # no short write got a final name
    assert not list(out.rglob(".*tmp*"))
    subprocess.run(["mount", "-o", "remount,size=4m", str(out.parent)], check=True)
    assert cli(*args, "--out", out).exit_code == 0
    same_prepared(tmp_path / "ref", out)


def test_download_on_a_full_tmpfs_fails_in_one_line(server, tmp_path, tmpfs, monkeypatch):
    server.files["/zips/val2014.zip"] = blob = pack()
    monkeypatch.setitem(dl.CHECKSUMS, "val2014.zip", (len(blob), sha(blob)))
    args = ["download", "coco", "--what", "val", "--mirror", server.url, "--quiet", "--retry-delay", "0"]
    dest = tmpfs("full", "size=64k") / "d"
    one_error_line(cli(*args, "--dest", dest), f"{dest / 'archives'}", "No space left")  # known size: refused up front
    server.no_length.add("/zips/val2014.zip")
    monkeypatch.setitem(dl.CHECKSUMS, "val2014.zip", (None, None))  # nothing tells its size: the write fails
    one_error_line(cli(*args, "--dest", dest), f"{dest / 'archives' / 'val2014.zip.part'}: No space left on device")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros/big.bin", bytes(1 << 20))  # compresses to little: the disk fills while extracting
    server.files["/zips/val2014.zip"] = buf.getvalue()
    shutil.rmtree(dest)
    one_error_line(cli(*args, "--dest", dest), f"{dest / 'zeros' / 'big.bin'}: No space left on device")
    assert not (dest / "zeros" / "big.bin").exists() and not list(dest.rglob("*.extracting"))
    assert not (dest / ".captions-download").exists()


@pytest.mark.parametrize("stage", ["prepare", "download"])
def test_read_only_output_is_one_line(server, tmp_path, tmpfs, stage):
    csv = csv_set(tmp_path / "src")
    server.files["/pack.zip"] = make_zip({"x.txt": b"x"})
    ro = tmpfs("ro", "ro,size=64k")
    if stage == "prepare":
        result = cli("prepare", "csv", csv, "--out", ro, "--workers", "1", "--min-count", "1", "--quiet")
    else:
        result = cli("download", "flickr8k", "--dest", ro, "--mirror", server.url, "--quiet")
    one_error_line(result, f"{ro}", "Read-only file system")
    assert not any(ro.iterdir())

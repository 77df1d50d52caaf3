"""``captions download``: resume, retries, checksums, safe extraction, layout — all against a local server."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shlex
import socket
import stat
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from captions.cli import main
from captions.errors import CaptionsError
from captions.pipeline import download as dl
from captions.pipeline.archive import CorruptArchive, check_archive, extract_archive
from captions.pipeline.download import Archive, apply_mirror, download_dataset, fetch, parse_checksum, plan
from tests.conftest import write_image

FAST = {"tries": 3, "retry_delay": 0, "timeout": 5, "progress": False}


# ------------------------------------------------------------------------------------------ the server
class FakeServer(ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes) on 127.0.0.1 with knobs to misbehave."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.range_support = True
        self.cut_after: dict[str, int] = {}  # path -> body bytes sent before dropping the connection (once)
        self.cuts: dict[str, list[int]] = {}  # path -> the same, for the next requests in turn
        self.cut_always: dict[str, int] = {}  # path -> the same, on every request
        self.no_length: set[str] = set()  # paths answered without Content-Length (the body ends at the close)
        self.versions: dict[str, list[bytes]] = {}  # path -> what the next requests get in turn (then files)
        self.stall_after: dict[str, int] = {}  # path -> body bytes sent before stalling 0.6 s (once)
        self.fail_first: dict[str, int] = {}  # path -> number of 503 answers before serving it
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        srv, path, rng = self.server, self.path, self.headers.get("Range")
        with srv.lock:
            srv.requests.append((path, rng))
            fail = srv.fail_first.get(path, 0)
            if fail:
                srv.fail_first[path] = fail - 1
            cut = None if fail else srv.cut_after.pop(path, None)
            if cut is None and not fail:
                cut = srv.cuts[path].pop(0) if srv.cuts.get(path) else srv.cut_always.get(path)
            stall = None if fail else srv.stall_after.pop(path, None)
            data = srv.versions[path].pop(0) if srv.versions.get(path) else srv.files.get(path)
        if fail:
            self.send_error(503, "Service Unavailable")
            return
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if rng and srv.range_support:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if path not in srv.no_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cut is not None:  # announce everything, send part of it, hang up
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if stall is not None:
            self.wfile.write(body[:stall])
            self.wfile.flush()
            time.sleep(0.6)
            return  # the client timed out and left; do not send the rest
        self.wfile.write(body)


def payload(n: int = 300_000, seed: int = 0) -> bytes:
    """A zip archive of about ``n`` bytes (one stored member of random bytes): ``fetch`` checks
    that what it downloads is a whole archive."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("blob.bin", random.Random(seed).randbytes(max(n - 200, 1)))
    return buf.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------------------------ fetch
def test_cut_off_download_resumes_with_range_and_gives_exact_bytes(server, tmp_path):
    data = payload()
    server.files["/f.zip"] = data
    server.cut_after["/f.zip"] = 100_000
    out = fetch(server.url + "/f.zip", tmp_path / "f.zip", sha(data), len(data), **FAST)
    assert out.read_bytes() == data
    assert not (tmp_path / "f.zip.part").exists()
    assert server.requests == [("/f.zip", None), ("/f.zip", "bytes=100000-")]


def test_existing_part_is_resumed(server, tmp_path):
    data = payload()
    server.files["/f.zip"] = data
    (tmp_path / "f.zip.part").write_bytes(data[:12345])
    fetch(server.url + "/f.zip", tmp_path / "f.zip", sha(data), **FAST)
    assert (tmp_path / "f.zip").read_bytes() == data
    assert server.requests == [("/f.zip", "bytes=12345-")]


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    data = payload()
    server.files["/f.zip"] = data
    server.range_support = False
    server.cut_after["/f.zip"] = 70_000
    (tmp_path / "f.zip.part").write_bytes(b"stale bytes that are not a prefix of the file")
    fetch(server.url + "/f.zip", tmp_path / "f.zip", sha(data), **FAST)
    assert (tmp_path / "f.zip").read_bytes() == data  # stale part truncated, cut attempt restarted
    assert [r for _, r in server.requests] == ["bytes=45-", "bytes=70000-"]


def test_complete_part_answered_416_is_finalised(server, tmp_path):
    data = payload(5000)
    server.files["/f.zip"] = data
    (tmp_path / "f.zip.part").write_bytes(data)
    fetch(server.url + "/f.zip", tmp_path / "f.zip", sha(data), **FAST)
    assert (tmp_path / "f.zip").read_bytes() == data


def test_5xx_is_retried_then_gives_up_with_one_line(server, tmp_path):
    data = payload(5000)
    server.files["/f.zip"] = data
    server.fail_first["/f.zip"] = 2
    fetch(server.url + "/f.zip", tmp_path / "f.zip", **FAST)  # 3 tries: 503, 503, 200
    assert (tmp_path / "f.zip").read_bytes() == data
    server.fail_first["/g.zip"] = 5
    server.files["/g.zip"] = data
    with pytest.raises(CaptionsError, match=r"HTTP 503 .*gave up after 3 tries") as e:
        fetch(server.url + "/g.zip", tmp_path / "g.zip", **FAST)
    assert "\n" not in str(e.value)


def test_stalled_connection_times_out_and_resumes(server, tmp_path):
    data = payload()
    server.files["/f.zip"] = data
    server.stall_after["/f.zip"] = 50_000
    fetch(server.url + "/f.zip", tmp_path / "f.zip", sha(data), **{**FAST, "timeout": 0.2})
    assert (tmp_path / "f.zip").read_bytes() == data
    assert server.requests[-1] == ("/f.zip", "bytes=50000-")


def test_404_is_not_retried(server, tmp_path):
    with pytest.raises(CaptionsError, match="HTTP 404"):
        fetch(server.url + "/missing.zip", tmp_path / "missing.zip", **FAST)
    assert len(server.requests) == 1


def test_checksum_mismatch_is_an_error_and_keeps_no_file(server, tmp_path):
    data = payload(5000)
    server.files["/f.zip"] = data
    bad = "sha256:" + "0" * 64
    with pytest.raises(CaptionsError, match="checksum mismatch"):
        fetch(server.url + "/f.zip", tmp_path / "f.zip", bad, **FAST)
    assert not (tmp_path / "f.zip").exists() and not (tmp_path / "f.zip.part").exists()
    # md5 and bare hex digests are accepted too
    fetch(server.url + "/f.zip", tmp_path / "f.zip", "md5:" + hashlib.md5(data).hexdigest(), **FAST)
    assert (tmp_path / "f.zip").read_bytes() == data
    assert parse_checksum(hashlib.md5(data).hexdigest())[0] == "md5"
    with pytest.raises(CaptionsError, match="bad checksum"):
        parse_checksum("crc32:1234")


def test_size_from_table_must_match_the_server(server, tmp_path):
    server.files["/f.zip"] = payload(5000)
    with pytest.raises(CaptionsError, match="should have 5001"):
        fetch(server.url + "/f.zip", tmp_path / "f.zip", None, 5001, **FAST)
    assert not (tmp_path / "f.zip").exists()


# ------------------------------------------------------------------------------------------ misbehaving servers
def test_no_length_and_an_early_close_is_resumed_not_stored_truncated(server, tmp_path):
    data = payload()
    server.files["/f.zip"] = data
    server.no_length.add("/f.zip")
    server.cut_after["/f.zip"] = 100_000  # the body just ends: nothing tells the client it is short
    out = fetch(server.url + "/f.zip", tmp_path / "f.zip", **FAST)  # no checksum, no size known
    assert out.read_bytes() == data
    assert server.requests == [("/f.zip", None), ("/f.zip", "bytes=100000-")]  # the member list did not read


def test_no_length_server_that_always_closes_early_leaves_nothing_final(server, tmp_path):
    server.files["/f.zip"] = payload()
    server.no_length.add("/f.zip")
    server.range_support = False
    server.cut_always["/f.zip"] = 100_000
    with pytest.raises(CaptionsError, match=r"not a whole zip .*no length.*gave up after 3 tries") as e:
        fetch(server.url + "/f.zip", tmp_path / "f.zip", **FAST)
    assert "\n" not in str(e.value)
    assert len(server.requests) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no final archive, and the suspect part is gone


def test_range_ignoring_server_that_closes_early_is_bounded_by_tries(server, tmp_path, monkeypatch):
    # the issue: 569 requests in 60 s with --tries 3, each restart "making progress" from byte 0
    data = payload()
    server.files["/annotations/annotations_trainval2014.zip"] = data
    monkeypatch.setitem(dl.CHECKSUMS, "annotations_trainval2014.zip", (len(data), sha(data)))
    server.range_support = False
    server.cut_always["/annotations/annotations_trainval2014.zip"] = 70_000
    t = time.monotonic()
    result = run_cli("download", "coco", "--what", "annotations", "--dest", tmp_path / "d", "--mirror", server.url,
                     "--quiet", "--tries", "3", "--retry-delay", "0")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "connection closed after 70000 of" in lines[0] and "gave up after 3 tries" in lines[0]
    assert len(server.requests) == 3 and time.monotonic() - t < 10
    assert not (tmp_path / "d" / "archives" / "annotations_trainval2014.zip").exists()


def test_range_ignoring_server_still_progresses_by_comparing_what_is_held(server, tmp_path):
    data = payload()
    server.files["/f.zip"] = data
    server.range_support = False
    server.cuts["/f.zip"] = [100_000, 200_000]  # each try gets further than the last, from byte 0
    fetch(server.url + "/f.zip", tmp_path / "f.zip", sha(data), **FAST)
    assert (tmp_path / "f.zip").read_bytes() == data
    assert [r for _, r in server.requests] == [None, "bytes=100000-", "bytes=200000-"]


def test_truncated_archives_never_pass_the_check(tmp_path):
    data = make_zip({"a/x.txt": b"x" * 3000, "a/y.txt": b"y" * 3000})
    tar = make_tar(tmp_path / "t.tar", [("file", "a/x.txt", b"x" * 3000), ("file", "a/y.txt", b"y" * 3000)])
    cases = [("t.zip", data, range(0, len(data), 37)), ("t.tar", tar.read_bytes(), range(0, 4608, 256))]
    for name, blob, cuts in cases:  # the tar's members end at byte 4608; its zero blocks follow
        (tmp_path / name).write_bytes(blob)
        check_archive(tmp_path / name)  # whole: passes
        for cut in cuts:
            (tmp_path / name).write_bytes(blob[:cut])
            with pytest.raises(CorruptArchive, match="not a whole zip or tar archive"):
                check_archive(tmp_path / name)


def test_bad_archive_under_its_final_name_is_reported_and_fetched_again(coco_server, tmp_path):
    dest = tmp_path / "coco"
    blob = coco_server.blobs["val2014.zip"]
    (dest / "archives").mkdir(parents=True)
    (dest / "archives" / "val2014.zip").write_bytes(blob[: len(blob) // 2])  # what the old bug left behind
    result = run_cli("download", "coco", "--what", "val", "--dest", dest, "--mirror", coco_server.url, "--quiet")
    assert result.exit_code == 0, result.output
    assert (dest / "archives" / "val2014.zip").read_bytes() == blob
    assert len(list((dest / "val2014").iterdir())) == 2
    warned = [line for line in result.output.splitlines() if "fetching it again" in line]
    assert len(warned) == 1 and "val2014.zip" in warned[0] and "expected" in warned[0], result.output


def test_archive_corrupt_inside_is_fetched_again_once(server, tmp_path):
    good = make_zip({"pack/x.txt": b"hello" * 1000})
    bad = bytearray(good)
    bad[good.index(b"hello") + 7] ^= 0xFF  # a flipped bit in the member data: the CRC shows it on extraction
    server.files["/p.zip"] = good
    server.versions["/p.zip"] = [bytes(bad)]
    report = download_dataset([(server.url + "/p.zip", "p.zip", None)], tmp_path / "d", **FAST)
    assert report.done == ["p.zip"] and (tmp_path / "d" / "pack" / "x.txt").read_bytes() == b"hello" * 1000
    assert len(server.requests) == 2
    server.versions["/q.zip"] = [bytes(bad)]
    server.files["/q.zip"] = bytes(bad)
    with pytest.raises(CaptionsError, match=r"q\.zip: member 'pack/x\.txt' does not read back.*corrupt again"):
        download_dataset([(server.url + "/q.zip", "q.zip", None)], tmp_path / "e", **FAST)
    assert not (tmp_path / "e" / "archives" / "q.zip").exists() and not (tmp_path / "e" / ".captions-download").exists()
    assert not list((tmp_path / "e").rglob("x.txt*"))


# ------------------------------------------------------------------------------------------ extraction
def test_zip_slip_is_refused_naming_the_member(tmp_path):
    dest = tmp_path / "dest"
    for name in ("../evil.txt", "ok/../../evil.txt", "/abs/evil.txt", "C:/evil.txt", "..\\evil.txt"):
        arc = tmp_path / "bad.zip"
        arc.write_bytes(make_zip({"good.txt": b"fine", name: b"pwned"}))
        with pytest.raises(CaptionsError, match=re.escape(f"'{name}'")):
            extract_archive(arc, dest, progress=False)
        assert not (dest / "good.txt").exists()  # validated before anything is written
    assert not (tmp_path / "evil.txt").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bad.zip", "dest"]


def make_tar(path: Path, entries: list[tuple[str, str, bytes | str]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for kind, name, value in entries:
            info = tarfile.TarInfo(name)
            if kind in ("sym", "hard"):
                info.type, info.linkname = (tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE), value
                tf.addfile(info)
            else:
                info.size = len(value)
                tf.addfile(info, io.BytesIO(value))
    return path


def zip_link(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    """A zip entry that unpacks as a symbolic link (Unix mode bits in external_attr, target as data)."""
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


@pytest.mark.parametrize("kind,target", [("sym", "../outside"), ("sym", "/tmp"), ("sym", "sub/../../outside"),
                                         ("sym", "a.txt"), ("hard", "../../etc/passwd"), ("hard", "a.txt")])
def test_tar_with_any_link_is_refused_naming_archive_and_member(tmp_path, kind, target):
    arc = make_tar(tmp_path / "bad.tar", [("file", "a.txt", b"a"), (kind, "link", target),
                                          ("file", "z.txt", b"z")])
    (tmp_path / "outside").mkdir()
    refused = r"bad\.tar: refusing to extract member 'link': a (symbolic|hard) link"
    with pytest.raises(CaptionsError, match=refused) as e:
        extract_archive(arc, tmp_path / "dest", progress=False)
    assert "\n" not in str(e.value)
    assert not any((tmp_path / "outside").iterdir())
    assert not any((tmp_path / "dest").iterdir())  # refused before anything is written


def test_zip_with_a_symlink_is_refused_even_pointing_inside(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("d/x.txt", b"x")
        zf.writestr(*zip_link("d/y.txt", "x.txt"))
    arc = tmp_path / "links.zip"
    arc.write_bytes(buf.getvalue())
    with pytest.raises(CaptionsError, match=r"links\.zip: refusing to extract member 'd/y\.txt': a symbolic link"):
        extract_archive(arc, tmp_path / "dest", progress=False)
    assert not any((tmp_path / "dest").iterdir())


def test_links_already_in_the_destination_are_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_bytes(b"precious")
    dest = tmp_path / "dest"
    dest.mkdir()
    arc = tmp_path / "a.zip"
    # a folder that is a link: refused, naming it
    (dest / "sub").symlink_to(outside, target_is_directory=True)
    arc.write_bytes(make_zip({"sub/new.txt": b"pwned"}))
    with pytest.raises(CaptionsError, match=r"'sub/new\.txt': .*dest/sub is a link"):
        extract_archive(arc, dest, progress=False)
    # a file that is a link: refused, its target untouched
    (dest / "keep.txt").symlink_to(outside / "keep.txt")
    arc.write_bytes(make_zip({"keep.txt": b"pwned"}))
    with pytest.raises(CaptionsError, match=r"'keep\.txt': .*dest/keep\.txt is a link"):
        extract_archive(arc, dest, progress=False)
    # a link planted under the name of a member's temporary file: replaced, not written through
    (dest / ".new.txt.extracting").symlink_to(outside / "planted.txt")
    arc.write_bytes(make_zip({"new.txt": b"fine"}))
    assert extract_archive(arc, dest, progress=False) == 1
    assert (dest / "new.txt").read_bytes() == b"fine" and not (dest / "new.txt").is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (outside / "keep.txt").read_bytes() == b"precious"
    assert not (dest / ".new.txt.extracting").exists() and not (dest / ".new.txt.extracting").is_symlink()


def test_extraction_is_idempotent_and_repairs_partial_state(tmp_path):
    arc = tmp_path / "a.zip"
    arc.write_bytes(make_zip({"d/one.txt": b"one" * 100, "d/two.txt": b"two" * 100, "__MACOSX/d/._one.txt": b"junk"}))
    dest = tmp_path / "dest"
    assert extract_archive(arc, dest, progress=False) == 2
    assert not (dest / "__MACOSX").exists()
    assert extract_archive(arc, dest, progress=False) == 0  # all in place: nothing rewritten
    (dest / "d" / "one.txt").write_bytes(b"on")  # an interrupted write ...
    (dest / "d" / "two.txt").unlink()
    (dest / "d" / ".two.txt.extracting").write_bytes(b"tw")  # ... and a leftover temporary
    assert extract_archive(arc, dest, progress=False) == 2
    assert (dest / "d" / "one.txt").read_bytes() == b"one" * 100
    assert (dest / "d" / "two.txt").read_bytes() == b"two" * 100
    assert sorted(p.name for p in (dest / "d").iterdir()) == ["one.txt", "two.txt"]


# ------------------------------------------------------------------------------------------ dataset runs
def test_download_dataset_accepts_tuples_and_second_run_is_a_noop(server, tmp_path):
    z = make_zip({"pack/x.txt": b"hello"})
    server.files["/a/pack.zip"] = z
    items = [(server.url + "/a/pack.zip", "pack.zip", sha(z))]
    report = download_dataset(items, tmp_path / "d", **FAST)
    assert report.done == ["pack.zip"] and not report.already_complete
    assert (tmp_path / "d" / "pack" / "x.txt").read_bytes() == b"hello"
    marker = json.loads((tmp_path / "d" / ".captions-download" / "pack.zip.done").read_text())
    assert marker["checksum"] == sha(z) and marker["size"] == len(z)
    n = len(server.requests)
    again = download_dataset(items, tmp_path / "d", **FAST)
    assert again.already_complete and again.skipped == ["pack.zip"]
    assert len(server.requests) == n


def test_delete_archives(server, tmp_path):
    z = make_zip({"x.txt": b"hello"})
    server.files["/p.zip"] = z
    download_dataset([(server.url + "/p.zip", "p.zip", None)], tmp_path / "d", keep_archives=False, **FAST)
    assert (tmp_path / "d" / "x.txt").exists() and not (tmp_path / "d" / "archives").exists()
    assert download_dataset([(server.url + "/p.zip", "p.zip", None)], tmp_path / "d", **FAST).already_complete


def test_plan_uses_the_url_table_checksums_and_mirror():
    archives = plan("coco", "2017", ["val"], mirror="https://mirror.example/coco/")
    assert [a.url for a in archives] == ["https://mirror.example/coco/zips/val2017.zip"]
    assert archives[0].checksum.startswith("sha256:") and archives[0].size == 815585330
    assert [a.filename for a in plan("coco")] == ["annotations_trainval2014.zip", "train2014.zip", "val2014.zip"]
    flickr = plan("flickr8k")
    assert flickr[0].url == "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip"
    assert [a.extract_to for a in flickr] == [".", "Flickr8k_text"] and flickr[0].checksum is None
    assert apply_mirror("http://images.cocodataset.org/zips/a.zip", None) == "http://images.cocodataset.org/zips/a.zip"
    with pytest.raises(CaptionsError, match="unknown --what part 'test'"):
        plan("coco", "2014", ["test"])
    with pytest.raises(CaptionsError, match="mirror must be"):
        apply_mirror("http://x/a.zip", "ftp://m")
    assert Archive("http://h/p/q.zip").filename == "q.zip"


# ------------------------------------------------------------------------------------------ the CLI
def image_bytes(tmp_path: Path, seed: int) -> bytes:
    return write_image(tmp_path / f"img-{seed}.jpg", seed=seed).read_bytes()


@pytest.fixture
def coco_server(server, tmp_path, monkeypatch):
    """The server holding fake COCO 2014 archives, with the checksum table pointing at them."""
    ann = {}
    zips = {"train": {}, "val": {}}
    for split in ("train", "val"):
        imgs, anns = [], []
        for i in range(2):
            name = f"COCO_{split}2014_{i:012d}.jpg"
            zips[split][f"{split}2014/{name}"] = image_bytes(tmp_path, i + (10 if split == "val" else 0))
            imgs.append({"id": i + 1, "file_name": name})
            anns.append({"id": 10 * (i + 1), "image_id": i + 1, "caption": f"a red dog number {i}"})
        ann[f"annotations/captions_{split}2014.json"] = json.dumps({"images": imgs, "annotations": anns}).encode()
    blobs = {"annotations_trainval2014.zip": make_zip(ann), "train2014.zip": make_zip(zips["train"]),
             "val2014.zip": make_zip(zips["val"])}
    for name, blob in blobs.items():
        folder = "annotations" if name.startswith("annotations") else "zips"
        server.files[f"/{folder}/{name}"] = blob
        monkeypatch.setitem(dl.CHECKSUMS, name, (len(blob), sha(blob)))
    server.blobs = blobs
    return server


def test_cli_coco_download_then_prepare_runs_on_the_layout(coco_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dest = tmp_path / "coco"
    coco_server.cut_after["/zips/train2014.zip"] = 300  # one interrupted transfer on the way
    result = run_cli("download", "coco", "--year", "2014", "--dest", dest, "--mirror", coco_server.url,
                     "--quiet", "--retry-delay", "0")
    assert result.exit_code == 0, result.output
    assert (dest / "annotations" / "captions_train2014.json").is_file()
    assert len(list((dest / "train2014").iterdir())) == 2 and len(list((dest / "val2014").iterdir())) == 2
    for name, blob in coco_server.blobs.items():
        assert (dest / "archives" / name).read_bytes() == blob
    assert ("/zips/train2014.zip", "bytes=300-") in coco_server.requests  # resumed, not restarted
    command = result.output.strip().splitlines()[-1].removeprefix("next: ")
    args = shlex.split(command)
    assert args[:3] == ["captions", "prepare", "coco"]

    n = len(coco_server.requests)
    again = run_cli("download", "coco", "--dest", dest, "--mirror", coco_server.url, "--quiet")
    assert again.exit_code == 0 and "already complete, nothing to do" in again.output
    assert len(coco_server.requests) == n

    prepared = run_cli(*args[1:], "--quiet", "--workers", "1", "--min-count", "1", "--image-size", "16")
    assert prepared.exit_code == 0, prepared.output
    assert "train 2 images" in prepared.output and "0 images skipped" in prepared.output


def test_cli_flickr8k_layout_matches_prepare(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = [f"{i}_abc.jpg" for i in range(4)]
    images = {f"Flicker8k_Dataset/{n}": image_bytes(tmp_path, i) for i, n in enumerate(names)}
    images["__MACOSX/Flicker8k_Dataset/._0_abc.jpg"] = b"junk"
    text = {
        "Flickr8k.token.txt": "".join(f"{n}#{k}\ta dog runs {k}\n" for n in names for k in range(2)).encode(),
        "Flickr_8k.trainImages.txt": f"{names[0]}\n{names[1]}\n".encode(),
        "Flickr_8k.devImages.txt": f"{names[2]}\n".encode(),
        "Flickr_8k.testImages.txt": f"{names[3]}\n".encode(),
    }
    base = "/jbrownlee/Datasets/releases/download/Flickr8k"
    server.files[f"{base}/Flickr8k_Dataset.zip"] = make_zip(images)
    server.files[f"{base}/Flickr8k_text.zip"] = make_zip(text)
    monkeypatch.setenv("CAPTIONS_MIRROR", server.url)
    dest = tmp_path / "f8k"
    result = run_cli("download", "flickr8k", "--dest", dest, "--quiet", "--delete-archives")
    assert result.exit_code == 0, result.output
    assert (dest / "Flickr8k_text" / "Flickr8k.token.txt").is_file()
    assert sorted(p.name for p in (dest / "Flicker8k_Dataset").iterdir()) == names
    assert not (dest / "__MACOSX").exists() and not (dest / "archives").exists()
    args = shlex.split(result.output.strip().splitlines()[-1].removeprefix("next: "))
    assert args[:3] == ["captions", "prepare", "flickr8k"]
    prepared = run_cli(*args[1:], "--quiet", "--workers", "1", "--min-count", "1", "--image-size", "16")
    assert prepared.exit_code == 0, prepared.output
    assert "train 2 images / 4 captions" in prepared.output
    assert run_cli("download", "flickr8k", "--dest", dest, "--year", "2017").exit_code != 0


def test_cli_checksum_mismatch_is_one_error_line(coco_server, tmp_path, monkeypatch):
    monkeypatch.setitem(dl.CHECKSUMS, "val2014.zip", (len(coco_server.blobs["val2014.zip"]), "md5:" + "0" * 32))
    dest = tmp_path / "coco"
    result = run_cli("download", "coco", "--what", "val", "--dest", dest, "--mirror", coco_server.url, "--quiet")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "checksum mismatch" in lines[0]
    assert not (dest / "archives" / "val2014.zip").exists() and not (dest / "val2014").exists()
    assert not (dest / ".captions-download").exists()


def test_cli_unreachable_host_gives_one_clear_line(tmp_path):
    mirror = f"http://127.0.0.1:{free_port()}"
    result = run_cli("download", "coco", "--what", "annotations", "--dest", tmp_path / "coco", "--mirror", mirror,
                     "--quiet", "--tries", "2", "--retry-delay", "0", "--timeout", "2")
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: cannot download ")
    assert f"{mirror}/annotations/annotations_trainval2014.zip" in lines[0]
    assert "refused" in lines[0].lower() and "gave up after 2 tries" in lines[0]


def test_members_named_like_control_files_or_temporaries_are_refused(tmp_path):
    """An archive extracted into DEST cannot replace download's own lock, markers or archives, and a
    member named like another member's temporary file cannot make that member vanish."""
    for name in ("archives/Flickr8k_text.zip", ".captions-download/x.done", ".download.lock"):
        zpath = tmp_path / "a.zip"
        zpath.write_bytes(make_zip({"ok.txt": b"fine", name: b"forged"}))
        with pytest.raises(CaptionsError, match="reserved for the download"):
            extract_archive(zpath, tmp_path / "dest", progress=False, reserved=dl.CONTROL_NAMES)
        assert not (tmp_path / "dest" / "ok.txt").exists()
    zpath.write_bytes(make_zip({".x.extracting": b"first", "x": b"second"}))
    with pytest.raises(CaptionsError, match="temporary"):
        extract_archive(zpath, tmp_path / "dest2", progress=False)


def test_a_link_where_download_writes_is_refused_before_anything_is_fetched(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("archives", ".captions-download", "Flickr8k_text"):
        dest = tmp_path / f"dest-{name}"
        dest.mkdir()
        (dest / name).symlink_to(outside, target_is_directory=True)
        a = Archive("http://127.0.0.1:9/never", "t.zip", None, None, "Flickr8k_text")
        with pytest.raises(CaptionsError, match="is a link"):
            download_dataset([a], dest, progress=False, tries=1)
    assert list(outside.iterdir()) == []

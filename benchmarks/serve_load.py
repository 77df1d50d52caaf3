"""Load test of ``captions serve`` over loopback: concurrent clients, a share of bad uploads.

Starts the server on a checkpoint (or uses a running one with --url), captions the good images
once with ``Captioner`` exactly as ``captions caption`` does (the expected answers), then sends
--requests requests from --clients threads, each on its own keep-alive connection; every
``1 / --bad-fraction``-th request is a bad upload (truncated JPEG, text file, zero bytes, a 20000 x 1
PNG, a 30000 x 30000 PNG, a body over --max-upload-mb), cycling through those kinds. Reports
requests/s, p50/p99 latency, the status counts, any 5xx or wrong caption, and the server's
resident memory (VmRSS) before, at its peak and after. Bounded in requests and in time
(--time-limit); loopback only.

    .venv/bin/captions demo --out /tmp/demo
    .venv/bin/python benchmarks/serve_load.py --checkpoint /tmp/demo/run/best.pt \\
        --images /tmp/demo/prepared/images --max-batch 16
    .venv/bin/python benchmarks/serve_load.py ... --max-batch 1       # no batching

The helpers (``multipart``, ``Client``, ``bad_uploads``, ``start_server``, ``run_load``) are
also what tests/test_serve.py uses.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ payloads
def multipart(files: list[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """(filename, content, content type) files -> a multipart/form-data body (field ``image``) and its
    Content-Type header."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, data, ctype in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                  f"Content-Type: {ctype}\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def png_header_only(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of width x height, all black: tiny on disk however large it
    declares itself (30000 x 30000 is about 110 kB), to test the pixel limits."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def small_png(width: int, height: int) -> bytes:
    """A PNG of width x height written by PIL (a 20000 x 1 one is about 140 bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@dataclass
class Bad:
    """A bad upload and the status the service must answer it with."""

    kind: str
    body: bytes
    content_type: str
    status: int


def bad_uploads(good_jpeg: bytes, max_upload_bytes: int, oversize_bytes: int | None = None) -> list[Bad]:
    """One bad upload of each kind (multipart bodies, except the oversized raw one).

    ``oversize_bytes``: size of the too-large body (default: ``max_upload_bytes`` + 1 MB)."""
    def part(name: str, data: bytes, ctype: str) -> tuple[bytes, str]:
        return multipart([(name, data, ctype)])

    over = oversize_bytes or max_upload_bytes + 1_000_000
    return [
        Bad("truncated JPEG", *part("cut.jpg", good_jpeg[: len(good_jpeg) // 2], "image/jpeg"), 400),
        Bad("text file", *part("notes.txt", b"this is not an image\n" * 20, "text/plain"), 415),
        Bad("text file named .jpg", *part("notes.jpg", b"this is not an image\n" * 20, "image/jpeg"), 400),
        Bad("zero bytes", *part("empty.jpg", b"", "image/jpeg"), 400),
        Bad("20000 x 1 PNG", *part("wide.png", small_png(20000, 1), "image/png"), 413),
        Bad("30000 x 30000 PNG", *part("huge.png", png_header_only(30000, 30000), "image/png"), 413),
        Bad("oversized body", os.urandom(1024) * (over // 1024 + 1), "image/jpeg", 413),
    ]


# -------------------------------------------------------------------------------------------- client
class Client:
    """One keep-alive HTTP connection; reconnects when the server closed it (after a 413)."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname or "127.0.0.1", parts.port or 80, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict]:
        """Send one request; (status, JSON body). A connection the server had closed (keep-alive
        timeout, or after a 413) is reopened and the request sent once more."""
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                data = resp.read()
            except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
                self.close()
                if attempt:
                    raise
                continue
            if resp.getheader("connection", "").lower() == "close":
                self.close()
            return resp.status, json.loads(data) if data else {}
        raise AssertionError("unreachable")

    def post_images(self, files: list[tuple[str, bytes, str]], query: str = "") -> tuple[int, dict]:
        """POST (filename, content, type) files as one multipart request to /v1/captions + ``query``."""
        body, ctype = multipart(files)
        return self.request("POST", "/v1/captions" + query, body, {"Content-Type": ctype})

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# -------------------------------------------------------------------------------------------- server
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(checkpoint: str | os.PathLike, *args: str, port: int | None = None,
                  log: str | os.PathLike | None = None, env: dict[str, str] | None = None
                  ) -> tuple[subprocess.Popen, str]:
    """Start ``captions serve CHECKPOINT --port P ARGS`` on 127.0.0.1 (CPU) without waiting for it;
    returns (process, base URL). ``env``: extra environment variables."""
    port = port or free_port()
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (handed to the process)
    proc = subprocess.Popen([sys.executable, "-m", "captions", "serve", str(checkpoint), "--host", "127.0.0.1",
                             "--port", str(port), "--device", "cpu", *args], stdout=out, stderr=subprocess.STDOUT,
                            cwd=ROOT, env={**os.environ, **(env or {})})
    proc.log = log  # type: ignore[attr-defined]
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 120.0) -> None:
    """Wait until the server answers /healthz with 200; RuntimeError (with its log's tail) if it
    exits or does not get ready within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = getattr(proc, "log", None)
            text = Path(log).read_text(errors="replace")[-2000:] if log else ""
            raise RuntimeError(f"captions serve exited with {proc.returncode}: {text}")
        try:
            if Client(url, timeout=2).request("GET", "/healthz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"captions serve did not become ready within {timeout} s")


def start_server(checkpoint: str | os.PathLike, *args: str, port: int | None = None,
                 log: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                 timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """``launch_server``, then ``wait_ready``: the process and its base URL, ready."""
    proc, url = launch_server(checkpoint, *args, port=port, log=log, env=env)
    wait_ready(proc, url, timeout)
    return proc, url


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM, then wait for the exit status (kill after ``timeout``)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler(threading.Thread):
    """Samples a process's resident memory every ``every`` seconds until ``stop()``; ``peak``."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak = pid, every, 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except OSError:
                return
            self._stop_event.wait(self.every)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return self.peak


# ---------------------------------------------------------------------------------------------- load
@dataclass
class LoadResult:
    """What ``run_load`` saw: statuses, latencies of the good requests, wrong answers, batch sizes."""

    requests: int = 0
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)  # good requests
    wrong: list[str] = field(default_factory=list)  # a good answer that differs, or a bad upload's wrong status
    client_errors: list[str] = field(default_factory=list)
    batch_sizes: Counter = field(default_factory=Counter)

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile of the good requests' latencies, in ms."""
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else float("nan")

    def summary(self) -> dict:
        """The figures as a JSON-able dict (requests/s, p50/p99 ms, statuses, 5xx, wrong answers...)."""
        return {"requests": self.requests, "seconds": round(self.seconds, 2),
                "requests_per_s": round(self.requests / self.seconds, 1) if self.seconds else 0.0,
                "p50_ms": round(self.percentile(50), 1), "p99_ms": round(self.percentile(99), 1),
                "statuses": dict(sorted(self.statuses.items())),
                "server_errors": sum(n for s, n in self.statuses.items() if s >= 500),
                "wrong": len(self.wrong), "client_errors": len(self.client_errors),
                "mean_batch": round(sum(k * v for k, v in self.batch_sizes.items()) /
                                    max(1, sum(self.batch_sizes.values())), 2)}


def run_load(url: str, good: list[tuple[str, bytes, str]], bad: list[Bad], requests: int, clients: int,
             bad_fraction: float = 0.1, time_limit: float = 300.0) -> LoadResult:
    """Send ``requests`` requests from ``clients`` threads: good ones are one (filename, JPEG bytes,
    expected caption) each, in turn; a ``bad_fraction`` share are ``bad`` uploads, in turn. Stops
    issuing new requests after ``time_limit`` seconds."""
    plan = []
    for i in range(requests):  # bad where the running count of bad ones steps up: evenly spread
        is_bad = int((i + 1) * bad_fraction) > int(i * bad_fraction)
        plan.append(("bad", bad[int(i * bad_fraction) % len(bad)]) if is_bad and bad else ("good", good[i % len(good)]))
    result, lock, counter = LoadResult(), threading.Lock(), iter(range(len(plan)))
    t0 = time.perf_counter()

    def worker() -> None:
        client = Client(url)
        while time.perf_counter() - t0 < time_limit:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            kind, item = plan[i]
            start = time.perf_counter()
            try:
                if kind == "good":
                    status, body = client.post_images([(item[0], item[1], "image/jpeg")])
                else:
                    status, body = client.request("POST", "/v1/captions", item.body,
                                                  {"Content-Type": item.content_type})
            except Exception as e:  # a failed connection is a finding, not a crash of the load test
                with lock:
                    result.client_errors.append(f"request {i}: {type(e).__name__}: {e}")
                continue
            ms = (time.perf_counter() - start) * 1000
            with lock:
                result.requests += 1
                result.statuses[status] += 1
                if kind == "good":
                    result.latencies_ms.append(ms)
                    got = body.get("results", [{}])[0] if status == 200 else {}
                    result.batch_sizes[got.get("batch_size", 0)] += 1
                    if got.get("caption") != item[2]:
                        result.wrong.append(f"{item[0]}: {status} {got.get('caption', body)!r} != {item[2]!r}")
                elif status != item.status:
                    result.wrong.append(f"{item.kind}: {status} (expected {item.status}) {body}")
        client.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - t0
    return result


def expected_captions(checkpoint: str | os.PathLike, paths: list[Path], beam_size: int) -> list[str]:
    """The captions ``captions caption`` prints for ``paths`` (same code path: ``Captioner.caption``)."""
    from captions.captioner import Captioner

    cap = Captioner.from_checkpoint(checkpoint, device="cpu")
    return [r.caption for r in cap.caption(paths, beam_size=beam_size)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint to serve (and to compute the expected captions)")
    p.add_argument("--images", required=True, type=Path, help="folder of JPEGs for the good requests")
    p.add_argument("--num-images", type=int, default=16, help="distinct good images used")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--bad-fraction", type=float, default=0.1)
    p.add_argument("--time-limit", type=float, default=300.0, help="stop issuing requests after this many seconds")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--server-log", default="/tmp/captions-serve-load.log")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = p.parse_args(argv)

    paths = sorted(args.images.glob("*.jpg"))[: args.num_images]
    if not paths:
        p.error(f"no .jpg in {args.images}")
    expected = expected_captions(args.checkpoint, paths, args.beam_size)
    good = [(q.name, q.read_bytes(), c) for q, c in zip(paths, expected, strict=True)]
    proc, url = start_server(args.checkpoint, "--max-batch", str(args.max_batch), "--beam-size", str(args.beam_size),
                             log=args.server_log)
    try:
        limits = Client(url).request("GET", "/v1/model")[1]["limits"]
        bad = bad_uploads(good[0][1], limits["max_upload_bytes"])
        idle = rss_mb(proc.pid)
        sampler = RssSampler(proc.pid)
        sampler.start()
        res = run_load(url, good, bad, args.requests, args.clients, args.bad_fraction, args.time_limit)
        peak = sampler.stop()
        after = rss_mb(proc.pid)
    finally:
        code = stop_server(proc)
    summary = {**res.summary(), "clients": args.clients, "max_batch": args.max_batch, "beam_size": args.beam_size,
               "rss_mb": {"idle": round(idle), "peak": round(peak), "after": round(after)}, "exit_status": code,
               "first_wrong": res.wrong[:3], "first_client_errors": res.client_errors[:3]}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""``captions serve`` against a real server process on 127.0.0.1 (no mocks): the captions equal
``captions caption``'s, every error class from a small bad upload, batching, a bounded load,
queue full, graceful SIGTERM, and the page in headless Chromium."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from benchmarks.serve_load import (
    Client,
    RssSampler,
    bad_uploads,
    launch_server,
    multipart,
    rss_mb,
    run_load,
    stop_server,
    wait_ready,
)
from benchmarks.serve_screenshot import chromium_driver, missing_browser, upload_and_hover
from captions.cli import main
from captions.demo import decoder_threads
from captions.features.extract import ExtractOptions, extract_features
from captions.pipeline.prepare import prepare_synthetic
from captions.pipeline.prepared import load_prepared
from captions.pipeline.settings import PrepareOptions
from captions.trainer.train import TrainConfig, train

SIZE = 64  # CNN input: resnet18 gives a 2 x 2 feature grid


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny attention captioner trained long enough that images get different captions, its
    test images, and what ``captions caption --json`` prints for them."""
    root = tmp_path_factory.mktemp("serve")
    prepare_synthetic(root / "data", 48, 8, 8, seed=0, options=PrepareOptions(min_count=1, image_size=SIZE),
                      workers=1, progress=False)
    cfg = TrainConfig.from_dict(dict(model="attn", epochs=6, batch_size=32, lr=1e-2, device="cpu", scst_epochs=0,
                                     decoder=dict(embed_dim=16, hidden_dim=32)))
    with decoder_threads():  # tiny matrices: one thread is as fast, and far faster on a busy machine
        extract_features(root / "data", root / "feats.h5", ExtractOptions(
            backbone="resnet18", weights="none", image_size=SIZE, dtype="float32", workers=0, batch_size=16),
            progress=False)
        train(root / "data", root / "feats.h5", root / "run", cfg, progress=False)
    ds = load_prepared(root / "data")
    images = [ds.image_path(int(i)) for i in ds.split_image_ids("test")]
    ckpt = root / "run" / "best.pt"
    # the server starts (in its own process) while the CLI captions the same images here
    proc, url = launch_server(ckpt, "--max-batch", "8", "--max-wait-ms", "20", "--queue", "16",
                              log=root / "server.log")
    r = CliRunner().invoke(main, ["caption", *map(str, images), "--checkpoint", str(ckpt), "--device", "cpu",
                                  "--json"])
    assert r.exit_code == 0, r.output
    expected = {row["image"]: row["caption"] for row in json.loads(r.stdout)}
    assert len(set(expected.values())) > 1, expected  # captions that tell the images apart
    return {"root": root, "ckpt": ckpt, "images": images, "expected": [expected[str(p)] for p in images],
            "proc": proc, "url": url}


@pytest.fixture(scope="module")
def server(model):
    """``captions serve`` in its own process (launched by ``model``); stopped with SIGTERM (exit
    status 0) at the end."""
    proc, log = model["proc"], model["root"] / "server.log"
    try:
        wait_ready(proc, model["url"])
        yield {"proc": proc, "url": model["url"], "log": log}
    finally:
        assert stop_server(proc) == 0, log.read_text()[-2000:]


BOUNDARY = "x0x0x0"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>'
TEXT_FIELD = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="beam_size"\r\n\r\n3\r\n'
              f"--{BOUNDARY}--\r\n").encode()


def jpeg(path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/jpeg")


def test_captions_equal_the_cli_alone_batched_and_raw(model, server):
    client = Client(server["url"])
    status, body = client.post_images([jpeg(p) for p in model["images"]])  # one request: one batch of 8
    assert status == 200, body
    assert [r["caption"] for r in body["results"]] == model["expected"]
    assert [r["filename"] for r in body["results"]] == [p.name for p in model["images"]]
    assert {r["batch_size"] for r in body["results"]} == {8} and body["beam_size"] == 3
    for i, path in enumerate(model["images"]):  # alone (a batch of 1): the same caption and score
        status, one = client.request("POST", "/v1/captions", path.read_bytes(), {"Content-Type": "image/jpeg"})
        res = one["results"][0]
        assert status == 200 and res["caption"] == model["expected"][i] and res["batch_size"] == 1
        assert res["filename"] is None and res["words"] == res["caption"].split()
        assert res["score"] == pytest.approx(body["results"][i]["score"], rel=1e-4)
    status, greedy = client.post_images([jpeg(model["images"][0])], "?beam_size=1&length_penalty=0.5")
    assert status == 200 and greedy["beam_size"] == 1 and greedy["length_penalty"] == 0.5


def test_attention_maps_model_health_docs_and_page(model, server):
    client = Client(server["url"])
    status, body = client.post_images([jpeg(model["images"][0])], "?attention=true")
    assert status == 200
    res = body["results"][0]
    att = res["attention"]
    assert att["grid"] == [2, 2] and [w["word"] for w in att["words"]] == res["words"]
    for w in att["words"]:
        assert np.asarray(w["weights"]).shape == (2, 2) and sum(map(sum, w["weights"])) == pytest.approx(1, abs=1e-4)
        png = Image.open(io.BytesIO(base64.b64decode(w["overlay"].split(",", 1)[1])))
        assert png.format == "PNG" and png.mode == "RGBA" and png.size == (SIZE, SIZE)
    assert Image.open(io.BytesIO(base64.b64decode(att["image"].split(",", 1)[1]))).size == (SIZE, SIZE)

    status, info = client.request("GET", "/v1/model")
    assert status == 200 and info["decoder"] == "attn" and info["backbone"] == "resnet18"
    assert info["weights"] == "random" and info["vocab_size"] > 4 and info["has_attention"]
    assert "CIDEr" in info["best_val"] and info["limits"]["max_batch"] == 8
    status, health = client.request("GET", "/healthz")
    assert status == 200 and health["status"] == "ready" and health["capacity"] == 16
    status, schema = client.request("GET", "/openapi.json")
    post = schema["paths"]["/v1/captions"]["post"]
    assert status == 200 and {"400", "413", "415", "422", "503"} <= set(post["responses"])
    assert {"multipart/form-data", "image/*"} <= set(post["requestBody"]["content"])
    assert {"/v1/model", "/healthz"} <= set(schema["paths"])

    page = http.client.HTTPConnection("127.0.0.1", int(server["url"].rsplit(":", 1)[1]))
    page.request("GET", "/")
    resp = page.getresponse()
    html = resp.read().decode()
    assert resp.status == 200 and "default-src 'self'" in resp.getheader("Content-Security-Policy")
    assert 'src="static/app.js"' in html and "http://" not in html and "https://" not in html
    page.request("HEAD", "/")  # uptime checks and link checkers
    resp = page.getresponse()
    assert resp.status == 200 and resp.read() == b"" and resp.getheader("Content-Type").startswith("text/html")


def test_every_error_class_then_a_good_request(model, server):
    client = Client(server["url"])
    good = model["images"][0].read_bytes()
    cases = [(b.kind, b.body, b.content_type, b.status) for b in bad_uploads(good, 20_000_000, 50_000_000)]
    ico, png = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(ico, "ICO")
    Image.new("RGB", (16, 16), (30, 200, 30)).save(png, "PNG")
    good_png = png.getvalue()
    cases += [("raw text body", b"hello", "text/plain", 415),
              ("JSON body", b"{}", "application/json", 415),
              ("no file", *multipart([]), 400),
              ("a text field", TEXT_FIELD, f"multipart/form-data; boundary={BOUNDARY}", 422),
              ("raw SVG body", SVG, "image/svg+xml", 415),
              ("SVG file", *multipart([("logo.svg", SVG, "image/svg+xml")]), 415),
              ("ICO file", *multipart([("favicon.ico", ico.getvalue(), "image/x-icon")]), 415),
              ("more files than --queue", *multipart([jpeg(model["images"][0])] * 17), 413),
              ("a PNG cut after its signature", *multipart([("cut.png", good_png[:40], "image/png")]), 400),
              ("a GIF signature then junk", *multipart([("junk.gif", b"GIF89a" + bytes(range(50)), "image/gif")]),
               400)]
    needles = {"raw SVG body": "image 0 is declared image/svg+xml, an image format not accepted",
               "SVG file": "image 0 (logo.svg) is declared image/svg+xml",
               "ICO file": "image 0 (favicon.ico) is an image in ICO format; accepted: JPEG, PNG",
               "more files than --queue": "more than 16 images in one request (--queue 16)",
               "a PNG cut after its signature": "image 0 (cut.png) starts like a PNG file but its header is damaged",
               "a GIF signature then junk": "image 0 (junk.gif) starts like a GIF file but its header is damaged"}
    for kind, body, ctype, want in cases:
        status, answer = client.request("POST", "/v1/captions", body, {"Content-Type": ctype})
        assert status == want, (kind, answer)
        detail = answer["detail"]
        assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
        assert needles.get(kind, "") in detail, (kind, detail)
        status, ok = client.post_images([jpeg(model["images"][1])])  # the server answers the next good request
        assert status == 200 and ok["results"][0]["caption"] == model["expected"][1], kind
    for query, needle in (("?beam_size=0", "beam_size"), ("?beam_size=x", "beam_size"),
                          ("?attention=maybe", "attention"), ("?length_penalty=-1", "length_penalty")):
        status, answer = client.post_images([jpeg(model["images"][0])], query)
        assert status == 422 and needle in answer["detail"] and "\n" not in answer["detail"], (query, answer)
    assert server["proc"].poll() is None and "Traceback" not in server["log"].read_text()


def test_bounded_load_no_5xx_right_answers_bounded_memory(model, server):
    good = [(p.name, p.read_bytes(), c) for p, c in zip(model["images"], model["expected"], strict=True)]
    bad = bad_uploads(good[0][1], 20_000_000)
    pid = server["proc"].pid
    before = rss_mb(pid)
    sampler = RssSampler(pid)
    sampler.start()
    res = run_load(server["url"], good, bad, requests=120, clients=8, bad_fraction=0.1, time_limit=60)
    peak = sampler.stop()
    summary = res.summary()
    assert summary["requests"] == 120 and summary["server_errors"] == 0, summary
    assert not res.wrong and not res.client_errors, (res.wrong[:3], res.client_errors[:3])
    assert summary["statuses"][200] == 108 and max(res.batch_sizes) > 1, summary  # concurrent requests were batched
    assert peak - before < 400, (before, peak)  # MB: bodies spooled, queue bounded


@pytest.mark.skipif(missing_browser() is not None, reason=str(missing_browser()))
def test_page_in_headless_chromium(model, server, tmp_path):
    """The page, offline: upload a photo, read the caption, hover a word: its attention overlay shows."""
    url = server["url"]
    with chromium_driver() as driver:
        state = upload_and_hover(driver, url, model["images"][0], word=1)
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        width = driver.execute_script("return document.documentElement.scrollWidth")
        viewport = driver.execute_script("return window.innerWidth")
        driver.save_screenshot(str(tmp_path / "page.png"))
    assert " ".join(state["words"]) == model["expected"][0], state
    assert state["overlay_visible"] and state["overlay_src"].startswith("data:image/png;base64,"), state
    assert state["active"] == [state["words"][1]] and state["overlay_size"]["width"] > 100
    assert all(r.startswith(url) for r in resources), resources  # nothing from a CDN
    assert width <= viewport  # no sideways scrolling on a phone-sized window
    assert Image.open(tmp_path / "page.png").size[0] > 300


def test_queue_full_then_graceful_sigterm(model, server):
    """A request that does not fit the queue gets 503; SIGTERM answers the request in flight, then exits 0."""
    rng = np.random.default_rng(0)
    big = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)).save(big, "JPEG", quality=80)
    slow = [("big.jpg", big.getvalue(), "image/jpeg")] * 6  # ~1 s of decoding, resizing and captioning
    client, probe = Client(server["url"]), Client(server["url"])
    answers: list = []
    for _ in range(5):  # retried only if the slow request finished before the probe saw it admitted
        answers.clear()
        worker = threading.Thread(target=lambda: answers.append(client.post_images(slow)))
        worker.start()
        while probe.request("GET", "/healthz")[1]["admitted"] < len(slow) and worker.is_alive():
            time.sleep(0.002)
        status, body = probe.post_images([jpeg(model["images"][0])] * 11)  # 6 + 11 > --queue 16
        worker.join()
        if status == 503:
            break
    assert status == 503 and "queue full" in body["detail"], body
    assert answers[0][0] == 200

    answers.clear()
    worker = threading.Thread(target=lambda: answers.append(client.post_images(slow)))
    worker.start()
    while probe.request("GET", "/healthz")[1]["admitted"] == 0:
        time.sleep(0.002)
    os.kill(server["proc"].pid, signal.SIGTERM)
    worker.join(60)
    assert answers and answers[0][0] == 200 and len(answers[0][1]["results"]) == 6  # answered, not cut
    assert server["proc"].wait(60) == 0
    assert "Shutting down" in server["log"].read_text()

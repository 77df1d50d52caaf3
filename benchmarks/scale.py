"""Scale: train from a COCO-sized feature cache that does not fit the RAM budget.

Builds (once) a synthetic prepared dataset of 123,287 images x 5 captions and a feature cache of
RegNetX-400MF shape (49 positions x 400 channels, float16: about 4.8 GB), then times an `attn`
epoch slice streamed with a 1 GB feature budget and the same slice with the features in RAM,
reporting captions/s and peak RSS.

Usage: .venv/bin/python benchmarks/scale.py [--work /tmp/captions-scale] [--steps 60] [--budget-gb 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

N_IMAGES, CAPS, P, C, CHUNK = 123_287, 5, 49, 400, 256


def build(work: Path) -> tuple[Path, Path]:
    """Write the prepared dataset and the cache with the project's own writers and format."""
    import h5py

    from captions.features.cache import FORMAT_NAME, FORMAT_VERSION
    from captions.fsutil import sha256_file, sha256_json, write_json_atomic
    from captions.pipeline.prepared import FORMAT_NAME as PREP_FORMAT
    from captions.pipeline.prepared import FORMAT_VERSION as PREP_VERSION
    from captions.pipeline.vocab import Vocabulary

    data, cache = work / "prepared", work / "features.h5"
    if (data / "manifest.json").exists() and cache.exists():
        return data, cache
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(1000)]
    vocab = Vocabulary.build([words], min_count=1)
    splits = np.where(np.arange(N_IMAGES) < N_IMAGES - 5000, "train", "val")
    lengths = rng.integers(8, 17, size=N_IMAGES * CAPS)
    tokens = rng.integers(0, len(words), size=(N_IMAGES * CAPS, 16))
    images = []
    for i in range(N_IMAGES):
        toks = [[words[t] for t in tokens[i * CAPS + j, : lengths[i * CAPS + j]]] for j in range(CAPS)]
        images.append({"id": i, "name": f"{i}.jpg", "file": f"images/{i}.jpg", "split": str(splits[i]),
                       "captions": [" ".join(t) for t in toks], "tokens": toks})
    write_json_atomic(data / "annotations.json", {"images": images})
    caps = np.stack([vocab.encode([words[t] for t in tokens[r, : lengths[r]]], 16) for r in range(len(lengths))])
    np.savez(data / "captions.npz", captions=caps.astype(np.int32),
             image_ids=np.repeat(np.arange(N_IMAGES), CAPS).astype(np.int32))
    vocab.save(data / "vocab.json")
    dataset_hash = sha256_json({"annotations": sha256_file(data / "annotations.json"),
                                "captions": sha256_file(data / "captions.npz"), "vocab": vocab.hash})
    write_json_atomic(data / "manifest.json", {
        "format": PREP_FORMAT, "format_version": PREP_VERSION, "vocab_hash": vocab.hash, "vocab_size": len(vocab),
        "dataset_hash": dataset_hash, "counts": {}, "skipped": [], "skipped_count": 0, "options": {}})
    with h5py.File(cache, "w") as f:
        sp = f.create_dataset("spatial", (N_IMAGES, P, C), dtype="float16", chunks=(CHUNK, P, C))
        po = f.create_dataset("pooled", (N_IMAGES, C), dtype="float16", chunks=(CHUNK, C))
        for a in range(0, N_IMAGES, CHUNK):
            b = min(a + CHUNK, N_IMAGES)
            block = rng.random((b - a, P, C), dtype=np.float32).astype(np.float16)
            sp[a:b] = block
            po[a:b] = block.mean(1)
        f.create_dataset("image_ids", data=np.arange(N_IMAGES))
        f.create_dataset("names", data=[im["name"] for im in images], dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("valid", data=np.ones(N_IMAGES, dtype=bool))
        f.create_dataset("chunks_done", data=np.ones(-(-N_IMAGES // CHUNK), dtype=bool))
        attrs = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "backbone": "synthetic",
                 "weights": "random", "image_size": 224, "spatial_shape": [7, 7], "channels": C, "stride": 32,
                 "preprocessing": "{}", "dtype": "float16", "precision": "fp32", "dataset_hash": dataset_hash,
                 "chunk_rows": CHUNK, "compression": "none", "skipped": "[]", "complete": True}
        for k, v in attrs.items():
            f.attrs[k] = v
    return data, cache


def run_slice(data: str, cache: str, budget_gb: float, steps: int) -> None:
    """Child process: time ``steps`` attn training steps, print JSON with captions/s and peak RSS."""
    from captions.trainer.train import TrainConfig, train

    class Done(Exception):
        pass

    t = {}

    def cb(step: int) -> None:
        if step == 5:
            t["start"] = time.perf_counter()
        if step == steps:
            raise Done

    cfg = TrainConfig(model="attn", epochs=1, batch_size=128, ram_budget_gb=budget_gb, checkpoint_every=0)
    try:
        train(data, cache, Path(cache).parent / f"run-{budget_gb}", cfg, progress=False, step_callback=cb)
    except Done:
        pass
    per_batch = cfg.batch_size // CAPS * CAPS  # batches hold whole images: 25 images x 5 captions
    rate = (steps - 5) * per_batch / (time.perf_counter() - t["start"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"budget_gb": budget_gb, "captions_per_s": rate, "peak_rss_gb": rss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/captions-scale"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--budget-gb", type=float, default=1.0)
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        run_slice(args.child[0], args.child[1], args.budget_gb, args.steps)
        return
    t = time.perf_counter()
    data, cache = build(args.work)
    print(f"dataset + cache ready in {time.perf_counter() - t:.0f} s: {cache.stat().st_size / 1e9:.2f} GB")
    for budget in (args.budget_gb, 8.0):
        import shutil

        shutil.rmtree(args.work / f"run-{budget}", ignore_errors=True)
        out = subprocess.run([sys.executable, __file__, "--child", str(data), str(cache), "--budget-gb", str(budget),
                              "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()

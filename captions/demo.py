"""``captions demo``: the whole pipeline, offline and from scratch, on the synthetic shapes set.

generate + prepare -> extract features -> train ``attn`` -> evaluate on test -> caption a few test
images with attention maps -> a short report (also written to ``OUT/report.txt`` and ``report.json``).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from captions.errors import CaptionsError
from captions.fsutil import read_json, write_json_atomic
from captions.options import internal, setting

log = logging.getLogger("captions")

MARKER = ".captions-demo"  # an --out folder holding this was made by the demo (safe to refresh)


@dataclass
class DemoOptions:
    """Settings of ``captions demo`` (its options are generated from these fields); the defaults
    finish in a few minutes on 2 CPU cores. The training settings among them go to ``TrainConfig``."""

    backbone: str = setting("resnet18", "CNN: any 'extract-features' backbone.")
    weights: str = setting("auto", "auto: the library's pretrained weights when they can be had, else random "
                                   "initialisation; default, none, or a state_dict PATH.")
    image_size: int = setting(128, "Crop fed to the CNN.", min=32)
    num_images: tuple[int, int, int] = internal((1200, 150, 150))  # train, val, test
    epochs: int = setting(12, "Cross-entropy epochs.", min=1)
    batch_size: int = setting(32, "Most captions per batch.", min=1)
    lr: float = setting(3e-3, "Adam learning rate (peak, cosine schedule).")
    embed_dim: int = setting(64, "Word embedding size.", min=1)
    hidden_dim: int = setting(128, "Recurrent state size.", min=1)
    dropout: float = setting(0.1, "Dropout before the output layer.", min=0, max=0.95)
    # self-critical epochs did not help this small set (BLEU-4 0.649 -> 0.583 with 3)
    scst_epochs: int = setting(0, "Self-critical epochs after the cross-entropy ones (see 'captions train').", min=0)
    scst_lr: float = setting(1e-4, "Learning rate of the self-critical epochs.")
    beam_size: int = setting(3, "Beam size of the test evaluation and the sample captions.", min=1)
    samples: int = setting(4, "Test images captioned with attention maps.", min=0)
    device: str = setting("auto", "Where to run (auto: CUDA when torch sees one).", choices=("auto", "cpu", "cuda"))
    seed: int = setting(0, "Synthetic data and training seed.")


@contextlib.contextmanager
def decoder_threads() -> Iterator[None]:
    """One intra-op thread while the small decoder trains and decodes on CPU.

    Its matrices are small: on 2 cores one thread was as fast as two (about 1,300 captions/s), and
    when another process shares the cores, two threads slowed to about 200 captions/s while one
    kept its speed. The CNN (extraction, captioning) keeps the default.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_weights(backbone: str, weights: str, image_size: int) -> tuple[str, str]:
    """-> (weights argument for extraction, human description). ``auto`` tries the library's
    pretrained weights and falls back to random initialisation when they cannot be had."""
    from captions.features.backbones import WeightsUnavailable, build_backbone

    if weights != "auto":
        what = {"default": "pretrained (library default)", "none": "random initialisation"}.get(weights,
                                                                                             f"weights file {weights}")
        return weights, what
    try:
        build_backbone(backbone, "default", image_size)
    except WeightsUnavailable as e:
        reason = str(e).split("(", 1)[-1].split(")", 1)[0]
        log.warning("pretrained weights for %s are not available (%s): using RANDOM initialisation instead; "
                    "the synthetic set does not need ImageNet features", backbone, reason)
        return "none", "random initialisation (pretrained weights not available)"
    return "default", "pretrained (library default)"


def prepare_out_dir(out: Path) -> None:
    """Create ``out`` or check that it is the demo's own folder (never clobber anything else)."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise CaptionsError("exists and was not made by 'captions demo'; choose another --out", out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by 'captions demo'; its contents are replaced on the next run\n")


@contextlib.contextmanager
def _stage(times: dict[str, float], name: str, message: str, *args: Any) -> Iterator[None]:
    """Log a stage's start and add its seconds to ``times[name]``."""
    log.info(message, *args)
    t = time.perf_counter()
    yield
    times[name] = time.perf_counter() - t


def _extract(data: Path, manifest: dict[str, Any], opts: DemoOptions, progress: bool) -> tuple[Path, str, str]:
    """The demo's feature cache (its name carries the settings) -> (path, weights argument, description)."""
    from captions.features.extract import ExtractOptions, extract_features

    weights, weights_desc = resolve_weights(opts.backbone, opts.weights, opts.image_size)
    tag = {"default": "pretrained", "none": "random"}.get(weights, "file")
    name = f"features-{opts.backbone.replace('/', '_')}-{opts.image_size}-{tag}-{manifest['dataset_hash'][:12]}.h5"
    cache = data / name
    for stale in data.glob("features-*.h5*"):  # caches of earlier demo settings (this folder is the demo's own)
        if stale.name != name and not stale.name.startswith(name + "."):
            stale.unlink()
    extract_features(data, cache, ExtractOptions(backbone=opts.backbone, weights=weights,
                                                 image_size=opts.image_size, dtype="float32",
                                                 device=opts.device), progress=progress)
    return cache, weights, weights_desc


def _train(data: Path, cache: Path, run: Path, opts: DemoOptions, progress: bool) -> dict[str, Any]:
    from captions.trainer.train import TrainConfig, train

    if run.exists():
        shutil.rmtree(run)
    # the demo's training settings carry TrainConfig's (and the decoder's) names
    cfg = TrainConfig.from_dict({**asdict(opts), "model": "attn", "patience": opts.epochs, "checkpoint_every": 0})
    with decoder_threads():
        return train(data, cache, run, cfg, progress=progress)


def _caption_samples(ds, data: Path, checkpoint: Path, weights: str | None, out: Path,
                     opts: DemoOptions) -> tuple[list[dict[str, Any]], Any]:
    """Caption the first ``opts.samples`` test images with attention maps -> (samples, captioner)."""
    from captions.attention_maps import save_attention_grid
    from captions.captioner import Captioner

    test_images = [im for im in ds.images if im["split"] == "test"][: opts.samples]
    paths = [data / "source" / "test" / im["name"] for im in test_images]
    captioner = Captioner.from_checkpoint(checkpoint, device=opts.device, weights=weights)
    attention_dir = out / "attention"
    if attention_dir.exists():
        shutil.rmtree(attention_dir)
    samples = []
    for im, path, res in zip(test_images, paths, captioner.caption(paths, beam_size=opts.beam_size), strict=True):
        png = None
        if res.error is None and res.attention is not None and res.crop is not None:
            png = str(save_attention_grid(attention_dir / f"{path.stem}.png", res.crop, res.words, res.attention,
                                          res.caption))
        samples.append({"image": str(path), "caption": res.caption, "score": res.score,
                        "references": [" ".join(t) for t in im["tokens"][:2]], "attention_map": png,
                        "error": res.error})
    return samples, captioner


def run_demo(out: str | Path = "demo-output", options: DemoOptions | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run every stage into ``out`` and return the report (see ``format_report``).

    Layout: ``out/prepared`` (dataset and feature cache, reused when unchanged), ``out/run``
    (checkpoints, replaced on each run), ``out/eval`` (predictions.json, metrics.json),
    ``out/attention`` (one PNG per sample image), ``out/report.txt``, ``out/report.json``.
    """
    from captions.evaluation import evaluate_checkpoint
    from captions.pipeline.prepare import PrepareOptions, prepare_synthetic
    from captions.pipeline.prepared import load_prepared

    opts, out = options or DemoOptions(), Path(out)
    prepare_out_dir(out)
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    data = out / "prepared"
    with _stage(times, "prepare", "[1/5] generating and preparing the synthetic shapes set"):
        manifest = prepare_synthetic(data, *opts.num_images, seed=opts.seed,
                                     options=PrepareOptions(min_count=1, image_size=max(opts.image_size, 128)),
                                     workers=-1, progress=progress)
    with _stage(times, "features", "[2/5] extracting %s features at %d px", opts.backbone, opts.image_size):
        cache, weights, weights_desc = _extract(data, manifest, opts, progress)
    with _stage(times, "train", "[3/5] training an attention decoder for %d epochs", opts.epochs):
        trained = _train(data, cache, out / "run", opts, progress)
    with _stage(times, "evaluate", "[4/5] evaluating on the test split (beam %d)", opts.beam_size):
        with decoder_threads():
            record = evaluate_checkpoint(out / "run" / "best.pt", data, cache, split="test",
                                         beam_size=opts.beam_size, device=opts.device, out=out / "eval")
        ds = load_prepared(data)
        predictions = {r["image_id"]: r["caption"] for r in read_json(record["predictions"])}
    with _stage(times, "caption", "[5/5] captioning %d test images with attention maps", opts.samples):
        file_weights = weights if weights not in ("default", "none") else None
        samples, captioner = _caption_samples(ds, data, out / "run" / "best.pt", file_weights, out, opts)
    times["total"] = time.perf_counter() - t_all
    report = {
        "out": str(out), "options": asdict(opts), "weights": weights_desc,
        "backbone": opts.backbone, "spatial_grid": list(captioner.spatial_shape),
        "best_epoch": trained["best"].get("epoch"), "val": {k: v for k, v in trained["best"].items() if k != "epoch"},
        "test": record, "attributes": attribute_accuracy(ds.images, predictions),
        "shuffled": shuffled_baseline(ds.references("test"), predictions), "samples": samples,
        "attention_dir": str(out / "attention"), "seconds": {k: round(v, 1) for k, v in times.items()},
    }
    write_json_atomic(out / "report.json", report)
    (out / "report.txt").write_text(format_report(report) + "\n", encoding="utf-8")
    return report


def _attributes(text: str) -> dict[str, str | None]:
    """Colour, shape, size class and position named in a synthetic-set caption (None when absent)."""
    from captions.data.synthetic import COLOURS, POSITIONS, SHAPES, SIZE_SYNONYMS, where_phrase

    words = text.split()
    padded = f" {text} "
    size = next((cls for cls, syn in SIZE_SYNONYMS.items() for w in words if w in syn), None)
    phrases = sorted(((where_phrase(p), p) for p, _, _ in POSITIONS), key=lambda x: -len(x[0]))
    return {"colour": next((w for w in words if w in COLOURS), None),
            "shape": next((w for w in words if w in SHAPES), None), "size": size,
            "position": next((p for phrase, p in phrases if f" {phrase} " in padded), None)}


def attribute_accuracy(images: list[dict[str, Any]], predictions: dict[int, str]) -> dict[str, float]:
    """Synthetic set: share of images whose predicted caption names the drawn colour, shape, size
    (small/big) and position, each and all four together (chance: 0.2, 0.33, 0.5, 0.11)."""
    keys = ("colour", "shape", "size", "position")
    hits = dict.fromkeys((*keys, "all"), 0)
    for img, text in predictions.items():
        truth = _attributes(" ".join(images[img]["tokens"][0]))
        got = _attributes(text)
        ok = [got[k] is not None and got[k] == truth[k] for k in keys]
        for k, v in zip(keys, ok, strict=True):
            hits[k] += v
        hits["all"] += all(ok)
    n = max(len(predictions), 1)
    return {k: v / n for k, v in hits.items()}


def shuffled_baseline(references: dict[int, list[str]], predictions: dict[int, str]) -> dict[str, float]:
    """BLEU-4 and CIDEr of the same predictions given to the wrong images (each image gets the next
    one's caption): what fluent captions that ignore the image would score."""
    from captions.metrics import score_captions

    ids = sorted(predictions)
    shifted = {i: predictions[j] for i, j in zip(ids, ids[1:] + ids[:1], strict=True)}
    scores = score_captions(references, shifted, metrics=("bleu", "cider"))
    return {k: scores[k] for k in ("BLEU-4", "CIDEr") if k in scores}


def format_report(report: dict[str, Any]) -> str:
    """The demo's closing report: metrics table, sample captions, where the PNGs are, timings."""
    from captions.evaluation import metrics_table

    test, secs = report["test"], report["seconds"]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in secs.items() if k != "total")
    h, w = report["spatial_grid"]
    lines = [
        f"captions demo finished in {secs['total']:.0f} s ({stages})",
        f"backbone {report['backbone']} ({report['weights']}), {h}x{w} attention grid; "
        f"attn decoder, best val epoch {report['best_epoch']}",
        "",
        f"test split: {test['images']} images, beam size {test['beam_size']}",
        *("  " + line for line in metrics_table(test["metrics"]).splitlines()),
    ]
    blind = report.get("shuffled") or {}
    if blind:
        lines.append("  image-blind baseline (the same captions given to the wrong images): "
                     + ", ".join(f"{k} {v:.3f}" for k, v in blind.items()))
    acc = report.get("attributes") or {}
    if acc:
        lines.append("  captions naming the drawn " + ", ".join(f"{k} {100 * acc[k]:.0f}%" for k in
                                                           ("colour", "shape", "size", "position"))
                     + f"; all four {100 * acc['all']:.0f}% (chance: 20%, 33%, 50%, 11%)")
    lines += ["", "sample test captions:"]
    for s in report["samples"]:
        name = Path(s["image"]).name
        if s["error"]:
            lines.append(f"  {name}: {s['error']}")
            continue
        lines.append(f"  {name}  predicted: {s['caption']}")
        lines.append(f"  {' ' * len(name)}  reference: {s['references'][0]}")
    lines += ["", f"attention maps (one PNG per image, a heat map per word): {report['attention_dir']}/",
              f"predictions and metrics: {Path(test['predictions']).parent}/",
              f"checkpoint: {Path(report['out']) / 'run' / 'best.pt'}"]
    return "\n".join(lines)

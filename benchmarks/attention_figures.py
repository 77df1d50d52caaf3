"""The README's attention figures: captions and attention maps of a few val images of each set.

For each RUN_DIR/best.pt given, captions N val images spread evenly over the split of its prepared dataset with
``Captioner`` (the backbone re-run on the photo, as ``captions caption`` does), and writes
``docs/attention-<set>-<i>.png``: the photo and one heat-map tile per word (128 px tiles, a
256-colour palette, so each figure stays small), plus the reference captions in
``docs/attention-<set>.md`` for comparison.

Usage: .venv/bin/python benchmarks/attention_figures.py \\
    --run ucm=/tmp/captions-quality/runs/ucm-attn-e20 --run viic=/tmp/captions-quality/runs/viic-attn-e20 \\
    --weights ../shared/weights/tf_efficientnet_lite0.pth [--images 3] [--beam-size 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from captions.attention_maps import attention_grid
from captions.captioner import Captioner
from captions.pipeline.prepared import load_prepared

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, metavar="SET=RUN_DIR")
    ap.add_argument("--data", action="append", default=[], metavar="SET=DATASET_DIR",
                    help="prepared dataset of SET (default: the run dir's sibling ../../SET)")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--beam-size", type=int, default=3)
    args = ap.parse_args()
    data_dirs = dict(d.split("=", 1) for d in args.data)
    DOCS.mkdir(exist_ok=True)
    for spec in args.run:
        name, run = spec.split("=", 1)
        ckpt = Path(run) / "best.pt"
        ds = load_prepared(data_dirs.get(name, Path(run).parents[1] / name))
        cap = Captioner.from_checkpoint(ckpt, device="cpu", weights=args.weights)
        assert cap.decoder.checkpoint["dataset_hash"] == ds.dataset_hash, f"{ckpt} was trained on another dataset"
        val = ds.split_image_ids("val")
        ids = val[np.linspace(0, len(val) - 1, args.images).round().astype(int)]  # spread over the split
        results = cap.caption([ds.image_path(int(i)) for i in ids], beam_size=args.beam_size)
        lines = [f"# {name}: val images, beam {args.beam_size}", ""]
        for k, (i, res) in enumerate(zip(ids.tolist(), results, strict=True), 1):
            fig = attention_grid(res.crop, res.words, res.attention, res.caption, tile=128)
            path = DOCS / f"attention-{name}-{k}.png"
            fig.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
            lines += [f"## {path.name}", f"generated: {res.caption}", "references:"]
            lines += [f"- {c}" for c in ds.images[i]["captions"]] + [""]
            print(f"{path} ({path.stat().st_size / 1e3:.0f} kB): {res.caption}")
        (DOCS / f"attention-{name}.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()

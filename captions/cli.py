"""The ``captions`` command line: thin click wrappers over the importable stage functions."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from captions import __version__
from captions.demo import DemoOptions
from captions.errors import CaptionsError
from captions.models.registry import DECODERS
from captions.options import (
    checked_value,
    click_options,
    field_default,
    flag,
    option_fields,
    read_config_file,
    setting_names,
)
from captions.pipeline.settings import PrepareOptions, prepare_option_fields
from captions.serve.settings import ServeOptions
from captions.trainer.config import TrainConfig

# the settings of 'captions train' and 'captions demo' are written once, with their defaults and help,
# in these dataclasses and the decoder registry (none imports torch, so --help stays fast); the
# options below are generated from them


class CaptionsGroup(click.Group):
    """Turns ``CaptionsError`` into ``Error: <one line>`` on stderr and exit status 1; so too an
    ``OSError`` the stages did not word themselves (a full disk, a read-only folder, a path
    under a file), with the path and the system's reason."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CaptionsError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or type(e).__name__}") from None


@click.group(cls=CaptionsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="captions")
@click.option("-v", "--verbose", is_flag=True, help="Print debug messages.")
def main(verbose: bool) -> None:
    """Turn image-caption datasets into trained neural captioners.

    \b
    Stages, each reading what the previous one wrote:
      download          fetch COCO / Flickr8k archives (resumable, checksummed)
      prepare           parse captions, tokenize, build the vocabulary, resize images
      extract-features  run a CNN once and cache its features in HDF5
      backbones         list the backbones extract-features accepts
      train             fit a caption decoder (MODEL) from the cache
      evaluate, caption score a checkpoint, caption new images
      serve             an HTTP API and web page for a checkpoint (batched, with attention maps)
      demo              all of the above, offline, on the embedded synthetic set
    Run 'captions COMMAND --help' for the options of each.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        stream=sys.stderr, force=True)


# ---------------------------------------------------------------------------------------------- prepare
@main.command()
@click.argument("fmt", metavar="FORMAT", type=click.Choice(["coco", "flickr8k", "karpathy", "csv", "synthetic"]))
@click.argument("sources", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Prepared-dataset directory to write (created; resumable; one prepare at a time writes "
                   "into it: OUT/.prepare.lock).")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Folder holding the images [default: depends on FORMAT, see README].")
@click_options(prepare_option_fields())
@click.option("--workers", default=-1, show_default=True, type=int, help="Resize processes (-1: all cores).")
@click.option("--num-images", default="1200,150,150", show_default=True, callback=lambda c, p, v: _image_counts(v),
              help="synthetic only: train,val,test image counts (train at least 1).")
@click.option("--seed", default=0, show_default=True, help="synthetic only: generator seed.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def prepare(fmt, sources, out, images, workers, num_images, seed, quiet, **settings) -> None:
    """Parse captions, build the vocabulary, encode captions and resize images into OUT.

    \b
    FORMAT and SOURCE...:
      coco      captions_*.json (split from the name; images under --images, or ../ of the json)
      flickr8k  Flickr8k.token.txt (+ Flickr_8k.*Images.txt lists, found beside it) or Kaggle captions.txt
      karpathy  dataset_*.json (images at <--images or json dir>/<filepath>/<filename>)
      csv       image,caption[,split] tables (images under --images or <csv dir>/images)
      synthetic no SOURCE: generates the demo shapes set in OUT/source and prepares it
    """
    from captions.pipeline.prepare import prepare as run_prepare
    from captions.pipeline.prepare import prepare_synthetic

    if fmt == "synthetic":
        if sources:
            raise CaptionsError("synthetic takes no SOURCE (it generates its own)")
        n_train, n_val, n_test = num_images
    elif not sources:
        raise CaptionsError(f"{fmt} needs at least one SOURCE file")
    opts = PrepareOptions(**settings)
    if fmt == "synthetic":
        manifest = prepare_synthetic(out, n_train, n_val, n_test, seed=seed, options=opts, workers=workers,
                                     progress=not quiet)
    else:
        manifest = run_prepare(fmt, list(sources), out, images=images, options=opts, workers=workers,
                               progress=not quiet)
    counts = ", ".join(f"{s} {c['images']} images / {c['captions']} captions" for s, c in manifest["counts"].items())
    dropped = sum(manifest.get("captions_dropped", {}).values())
    click.echo(f"prepared {out}: {counts}; vocabulary {manifest['vocab_size']} tokens; "
               f"{manifest['skipped_count']} images skipped; {dropped} captions dropped")


def _image_counts(value: str) -> tuple[int, int, int]:
    """``--num-images`` of ``prepare synthetic``: 'train,val,test' with train >= 1, val and test >= 0."""
    try:
        counts = tuple(int(x) for x in value.split(","))
    except ValueError:
        counts = ()
    if len(counts) != 3 or counts[0] < 1 or min(counts) < 0:
        raise click.BadParameter(f"expected three integers train,val,test (train at least 1, the others at "
                                 f"least 0), got '{value}'")
    return counts  # type: ignore[return-value]


# ------------------------------------------------------------------------------------- extract-features
@main.command("extract-features")
@click.argument("dataset_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--backbone", default="regnet_x_400mf", show_default=True,
              help="Any torchvision classification model by name (regnet_x_400mf, resnet50, efficientnet_b0, "
                   "convnext_tiny, swin_t, vit_b_16, ...), timm/<model> (e.g. timm/vit_small_patch14_reg4_dinov2), "
                   "or a CLIP image tower as open_clip/<model>:<tag> (e.g. open_clip/ViT-B-32:openai); "
                   "'captions backbones [PATTERN]' lists them.")
@click.option("--weights", default="default", show_default=True,
              help="'default' (library's pretrained weights, downloaded), 'none' (random init), or a state_dict PATH "
                   "(open_clip: a whole CLIP or image-tower state_dict).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Cache file [default: DATASET_DIR/features-<backbone>-<size>.h5].")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(32),
              help="Crop fed to the backbone. Models made for one size (ViTs, Swin, LeViT) are built for it "
                   "(position embeddings resized), or refused naming the size they need.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=None, type=click.IntRange(0),
              help="DataLoader decode processes [default: 1 on CPU, 4 on CUDA].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--compression", type=click.Choice(["none", "lzf", "gzip"]), default="none", show_default=True,
              help="HDF5 compression (see benchmarks/README.md: it costs more than it saves here).")
@click.option("--chunk-rows", default=256, show_default=True, type=click.IntRange(1),
              help="Images per HDF5 chunk (also the unit of resume).")
@click.option("--channels-last", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Memory layout for the CNN (auto: on; it measured faster on CPU and GPU).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Forward-pass autocast. auto: bf16 on CUDA and on CPUs with native bf16, else fp32.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract_features_cmd(dataset_dir, backbone, weights, out, image_size, dtype, batch_size, workers, device,
                         compression, chunk_rows, channels_last, precision, quiet) -> None:
    """Run a CNN once over DATASET_DIR (from 'captions prepare') and cache its features in HDF5.

    Stores spatial features (N x h*w x C: the feature grid, or a ViT's patch tokens) for attention
    and pooled features (N x C: the model's own pooled vector, e.g. a ViT's class token or a CLIP
    image embedding, else the mean), row i = image id i, with the backbone, weights,
    preprocessing, token layout and dataset hash as attributes. Interrupted runs
    resume; under 'torchrun --nproc_per_node N -m captions extract-features ...' the images are
    split across ranks and merged into one file.
    """
    from captions.distributed import launch_rank
    from captions.features.extract import ExtractOptions, extract_features

    opts = ExtractOptions(backbone=backbone, weights=weights, image_size=image_size, dtype=dtype,
                          batch_size=batch_size, workers=workers, device=device, compression=compression,
                          chunk_rows=chunk_rows, channels_last=channels_last, precision=precision)
    path = extract_features(dataset_dir, out, opts, progress=not quiet)
    if launch_rank() == 0:
        click.echo(f"features: {path}")


@main.command("backbones")
@click.argument("pattern", required=False)
@click.option("--details/--no-details", default=None,
              help="Show channels and grid for every match (built on the meta device, ~0.5 s each) "
                   "[default: only when at most 20 names match].")
def backbones_cmd(pattern, details) -> None:
    """List the backbone names extract-features accepts, matching PATTERN.

    PATTERN is a shell glob ('timm/vit_small*', '*dinov2*') or, without * ? [, a case-insensitive
    substring. Each line: the name, channels, grid at the model's default image size, and where
    '--weights default' takes its weights from. Without PATTERN: every torchvision classification
    model, every timm model and every open_clip pretrained (model, tag).
    """
    from captions.features.catalog import DETAIL_LIMIT, backbones, format_info

    count = 0
    for info in backbones(pattern, details):
        click.echo(format_info(info))
        count += 1
    if not count:
        import difflib

        from captions.features.catalog import all_names

        close = difflib.get_close_matches(pattern, all_names(), n=5, cutoff=0.6)
        raise CaptionsError(f"no backbone name matches '{pattern}'"
                            + (f"; close matches: {', '.join(close)}" if close else ""))
    if details is None and count > DETAIL_LIMIT:
        click.echo(f"{count} names; channels and grid are shown for {DETAIL_LIMIT} or fewer matches: narrow "
                   f"PATTERN or add --details", err=True)


# ---------------------------------------------------------------------------------------------- download
@main.command()
@click.argument("dataset", metavar="DATASET", type=click.Choice(["coco", "flickr8k"]))
@click.option("--dest", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to download and extract into (created; an interrupted run resumes).")
@click.option("--year", type=click.Choice(["2014", "2017"]), default=None, show_default="2014",
              help="coco only: which release.")
@click.option("--what", default=None, show_default="annotations,train,val",
              help="coco only: comma-separated parts to fetch (annotations, train, val).")
@click.option("--mirror", envvar="CAPTIONS_MIRROR", default=None, metavar="URL_PREFIX",
              help="Fetch from this prefix instead of each URL's scheme://host (the path is kept) "
                   "[env: CAPTIONS_MIRROR].")
@click.option("--keep-archives/--delete-archives", default=True, show_default=True,
              help="Keep the downloaded archives in DEST/archives after extracting them.")
@click.option("--tries", default=6, show_default=True, type=click.IntRange(1),
              help="Attempts in a row that get no further before giving up; bounds every retry (connection "
                   "errors, timeouts, early disconnects, 5xx, a download that is not yet a whole archive).")
@click.option("--retry-delay", default=1.0, show_default=True, type=click.FloatRange(0),
              help="Seconds before the first retry; doubled each retry (at most 60).")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds to wait for a connection or for data.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def download(dataset, dest, year, what, mirror, keep_archives, tries, retry_delay, timeout, quiet) -> None:
    """Download DATASET (coco or flickr8k) into DEST, verify and extract it for 'captions prepare'.

    \b
    Resumes interrupted downloads (HTTP Range), retries with backoff, checks sizes and known
    checksums (else that the archive is whole) before an archive gets its name, extracts safely
    (links in an archive are refused, none already in DEST is followed), and does nothing when DEST
    is already complete. One download at a time writes into DEST (DEST/.download.lock). Prints the
    'captions prepare' command to run next.
    """
    from captions.pipeline.download import download_dataset, plan, prepare_command

    if dataset != "coco" and (year is not None or what is not None):
        raise CaptionsError("--year and --what apply to coco only")
    year = year or "2014"
    parts = None if what is None else [p.strip() for p in what.split(",") if p.strip()]
    archives = plan(dataset, year=year, what=parts, mirror=mirror)
    report = download_dataset(archives, dest, keep_archives=keep_archives, progress=not quiet, tries=tries,
                              retry_delay=retry_delay, timeout=timeout)
    if report.already_complete:
        click.echo(f"{dest}: already complete, nothing to do")
    else:
        click.echo(f"{dest}: downloaded, verified and extracted {', '.join(report.done)}")
    click.echo(f"next: {prepare_command(dataset, dest, year)}")


# ------------------------------------------------------------------------------------------------ train
def _train_fields() -> list:
    """(field, note, shown default) of every train option: TrainConfig's, then each decoder setting
    once, noting the decoders that have it when not all do; a setting whose default differs between
    decoders gets no default of its own (each decoder's applies) and shows them all."""
    out: list = [(f, "", None) for f in option_fields(TrainConfig)]
    owners: dict[str, list] = {}
    for entry in DECODERS.values():
        for f in option_fields(entry.config):
            owners.setdefault(f.name, []).append((entry.name, f))
    for fields in owners.values():
        models = [m for m, _ in fields]
        note = "" if len(models) == len(DECODERS) else f"[{', '.join(models)} only]"
        defaults = {m: field_default(f) for m, f in fields}
        shown = None
        if len(set(defaults.values())) > 1:
            shown = "; ".join(f"{m} {v}" for m, v in defaults.items())
        out.append((fields[0][1], note, shown))
    return out


_PATHS = ("data", "features", "out")


def _read_train_file(path: Path) -> dict:
    """A train config file as {setting: value}: its ``decoder`` mapping flattened, every value
    checked against its setting (type, bounds, choices). Raises ``CaptionsError`` naming the file."""
    file = read_config_file(path)
    decoder = file.pop("decoder", None) or {}
    if not isinstance(decoder, dict):
        raise CaptionsError("decoder must be a mapping of the decoder's settings", path)
    decoder = setting_names(decoder, path)
    if twice := sorted(set(file) & set(decoder)):
        raise CaptionsError(f"{twice[0].replace('_', '-')} is given twice (also under decoder)", path)
    file.update(decoder)
    fields = {f.name: f for f, *_ in _train_fields()}
    unknown = sorted(set(file) - set(fields) - {"model", *_PATHS})
    if unknown:
        raise CaptionsError(f"unknown setting(s) {', '.join(unknown)}", path)
    for name, value in file.items():
        try:
            if name in fields:
                file[name] = checked_value(fields[name], value)
            elif not isinstance(value, str):
                raise ValueError(f"must be a string, got {value!r}")
        except ValueError as e:
            raise CaptionsError(f"{name} {e}", path) from None
    return file


def _train_config(model: str, given: dict, config: Path | None) -> TrainConfig:
    """The TrainConfig of ``model`` from the settings ``given`` (command line over config file); a
    setting of another decoder is refused."""
    own = {f.name for f in option_fields(DECODERS[model].config)}
    training = {f.name for f in option_fields(TrainConfig)}
    for name in sorted(set(given) - own - training - {"model", *_PATHS}):
        where = f" (in {config})" if config is not None else ""
        raise CaptionsError(f"{flag(name)} does not apply to {model}{where}")
    return TrainConfig.from_dict({"model": model, **{k: v for k, v in given.items() if k in training},
                                  "decoder": {k: v for k, v in given.items() if k in own}})


@main.command("train")
@click.argument("model", required=False, type=click.Choice(list(DECODERS)))
@click.option("--data", "data", type=click.Path(file_okay=False, path_type=Path),
              help="Prepared-dataset directory (from 'captions prepare').")
@click.option("--features", type=click.Path(dir_okay=False, path_type=Path),
              help="Feature cache (from 'captions extract-features').")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory: best.pt, last.pt, metrics.jsonl, config.json.")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="YAML or JSON file of settings (names as the options, without '--'; also model, data, "
                   "features, out); options given on the command line override it. A run's config.json "
                   "is such a file (it records the settings, not --data, --features and --out).")
@click_options(_train_fields())
@click.option("--resume", is_flag=True, help="Continue the run in --out from last.pt.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def train_cmd(ctx, model, config, resume, quiet, **values) -> None:
    """Train a caption decoder MODEL from a feature cache (the CNN is never run).

    --epochs of cross-entropy, then --scst-epochs of self-critical training (sampled captions
    rewarded by their CIDEr-D) from the cross-entropy epoch of the lowest val loss (--scst-start);
    self-critical epochs are numbered after --epochs even when early stopping ended the first
    phase sooner. After each epoch: val loss, greedy val BLEU-4 and CIDEr, early stopping on CIDEr
    (per phase). Ctrl-C saves a checkpoint at the current step; '--resume' continues exactly from
    it. Under 'torchrun --nproc_per_node N -m captions train ...' training uses DistributedDataParallel.
    """
    from captions.distributed import launch_rank
    from captions.trainer.train import train

    given = _read_train_file(config) if config is not None else {}
    given.update({k: v for k, v in values.items()  # the command line overrides the file
                  if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT})
    model = model or given.get("model")
    paths = {k: Path(given[k]) if given.get(k) else None for k in _PATHS}
    missing = [k for k in ("model", *_PATHS) if not (model if k == "model" else paths[k])]
    if missing:
        raise CaptionsError(f"missing {', '.join('MODEL' if k == 'model' else '--' + k for k in missing)} "
                            f"(on the command line or in --config)")
    if model not in DECODERS:
        raise CaptionsError(f"unknown model '{model}' (choose one of: {', '.join(DECODERS)})", config)
    cfg = _train_config(model, given, config)
    given_names = {k for k in given if k not in _PATHS} | {"model"}
    result = train(paths["data"], paths["features"], paths["out"], cfg, resume=resume, progress=not quiet,
                   given=given_names)
    if launch_rank() == 0:
        b = result["best"]
        scores = (f", val CIDEr {b['CIDEr']:.3f}" if b.get("CIDEr") is not None  # None: undefined, one val image
                  else f", val loss {b['val_loss']:.3f} (CIDEr undefined)" if "val_loss" in b else "")
        scores += f", BLEU-4 {b['BLEU-4']:.3f}" if scores and "BLEU-4" in b else ""
        done = "already trained" if result.get("stopped_before") else "trained"  # a resumed run that had stopped
        click.echo(f"{done} {model}: best epoch {b.get('epoch')}{scores}; checkpoints in {paths['out']}")


# --------------------------------------------------------------------------------------------- evaluate
@main.command("evaluate")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Prepared-dataset directory the checkpoint was trained on.")
@click.option("--features", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Its feature cache (same backbone, weights and image size as at training). Left out: the "
                   "checkpoint's backbone (its fine-tuned encoder, after --fine-tune-encoder) runs on the split's "
                   "images, as extract-features would.")
@click.option("--split", default="test", show_default=True, help="Split to caption and score.")
@click.option("--beam-size", default=3, show_default=True, type=click.IntRange(1), help="1: greedy decoding.")
@click.option("--length-penalty", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Rank finished captions by log-prob / length**P (0: plain log-prob).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for predictions.json and metrics.json [default: next to CHECKPOINT, "
                   "eval-<name>-<split>-beam<K>].")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1), help="Images decoded at once.")
@click.option("--min-length", default=1, show_default=True, type=click.IntRange(0),
              help="Words each caption has at least (<END> is not chosen before; 0 allows empty captions).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Without --features only: the state_dict file the cache's features came from (sha256 checked), "
                   "to rebuild the backbone; a fine-tuned checkpoint carries its encoder and needs none.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics JSON on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate_cmd(checkpoint, data_dir, features, split, beam_size, length_penalty, out, batch_size, min_length, device,
                 weights, as_json, quiet) -> None:
    """Caption a split from the feature cache (or, without --features, from the checkpoint's own
    encoder run on the images) and score it: BLEU-1..4, METEOR, ROUGE-L, CIDEr.

    All reference captions of each image are used. METEOR needs Java; without it this says so once
    and reports the rest. Writes the predictions in COCO results format and the metrics as JSON.
    """
    from captions.evaluation import evaluate_checkpoint

    record = evaluate_checkpoint(checkpoint, data_dir, features, split=split, beam_size=beam_size,
                                 length_penalty=length_penalty, device=device, batch_size=batch_size, out=out,
                                 progress=not quiet and not as_json, min_length=min_length, weights=weights)
    _echo_scores(record, f"beam size {record['beam_size']}", as_json)


def _echo_scores(record: dict, how: str, as_json: bool) -> None:
    """Print a scored split (``evaluate_checkpoint`` / ``evaluate_nn`` record) as JSON or a table."""
    import json

    from captions.evaluation import metrics_table

    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    click.echo(f"{record['split']}: {record['images']} images, {how}")
    click.echo(metrics_table(record["metrics"], record.get("undefined_metrics", ())))
    if record.get("undefined_metrics"):
        click.echo(f"undefined: {', '.join(record['undefined_metrics'])} (fewer than two images)")
    click.echo(f"predictions: {record['predictions']}")
    click.echo(f"metrics: {Path(record['predictions']).parent / 'metrics.json'}")


# --------------------------------------------------------------------------------------------- baseline
@main.group("baseline")
def baseline_group() -> None:
    """Non-neural baselines to compare trained decoders against."""


@baseline_group.command("nn")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Prepared-dataset directory.")
@click.option("--features", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Its feature cache (the pooled features are used).")
@click.option("--split", default="val", show_default=True, help="Split to caption and score.")
@click.option("-k", "--k", "k", default=10, show_default=True, type=click.IntRange(1),
              help="Neighbouring training images whose captions are candidates.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for predictions.json and metrics.json [default: next to the cache, "
                   "baseline-nn-k<K>-<split>].")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics JSON on stdout.")
def baseline_nn_cmd(data_dir, features, split, k, out, as_json) -> None:
    """Nearest-neighbour caption retrieval, scored like 'captions evaluate'.

    For each image of the split: the captions of its K most similar training images (cosine of
    pooled features) are candidates, and the one with the highest mean n-gram TF-IDF similarity to
    the others (the consensus) is returned. No training; uses the same cache as the decoders.
    """
    from captions.baseline import evaluate_nn

    record = evaluate_nn(data_dir, features, split=split, k=k, out=out)
    _echo_scores(record, f"nearest-neighbour retrieval, k = {k}", as_json)


# ---------------------------------------------------------------------------------------------- caption
@main.command("caption")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint from 'captions train' (best.pt).")
@click.option("--beam-size", default=3, show_default=True, type=click.IntRange(1), help="1: greedy decoding.")
@click.option("--length-penalty", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Rank finished captions by log-prob / length**P (0: plain log-prob).")
@click.option("--attention-map", "attention_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="attn and transformer models: write DIR/<image name>.png, the photo with a heat map "
                   "per generated word.")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The backbone's state_dict file, when the checkpoint's features came from one (sha256 checked).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1), help="Images per forward pass.")
@click.option("--min-length", default=1, show_default=True, type=click.IntRange(0),
              help="Words each caption has at least (<END> is not chosen before; 0 allows empty captions).")
@click.option("--allow-unk", is_flag=True, help="Let captions contain <UNK> (a word the vocabulary lacks).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (image, caption, words, score, "
                                                      "attention_map or error) on stdout.")
@click.pass_context
def caption_cmd(ctx, images, checkpoint, beam_size, length_penalty, attention_dir, weights, batch_size, min_length,
                allow_unk, device, as_json) -> None:
    """Caption IMAGE... (JPEG, PNG, ...; any size or mode; EXIF-rotated) with a trained checkpoint.

    Re-runs the backbone the checkpoint's features came from (same weights, image size and
    preprocessing), then the decoder. A file that cannot be read gets a one-line error on stderr,
    the other images are still captioned, and the exit status is 1.
    """
    import json

    from captions.attention_maps import save_attention_grid
    from captions.captioner import Captioner

    if attention_dir is not None:  # refuse before building the CNN
        from captions.models.checkpoint import load_checkpoint

        model = load_checkpoint(checkpoint).get("model")
        if model not in DECODERS or not DECODERS[model].uses_spatial:
            raise CaptionsError(f"--attention-map needs an attention model; this checkpoint is '{model}'")
    captioner = Captioner.from_checkpoint(checkpoint, device=device, weights=weights)
    results = captioner.caption(list(images), beam_size=beam_size, length_penalty=length_penalty,
                                batch_size=batch_size, min_length=min_length, allow_unk=allow_unk)
    used: set[str] = set()
    rows, failed = [], 0
    for path, res in zip(images, results, strict=True):
        if res.error is not None:
            failed += 1
            click.echo(f"Error: {res.error}", err=True)
            rows.append({"image": str(path), "error": res.error})
            continue
        png = None
        if attention_dir is not None and res.attention is not None and res.crop is not None:
            stem, k = path.stem, 1
            while stem in used:
                k += 1
                stem = f"{path.stem}-{k}"
            used.add(stem)
            png = str(save_attention_grid(attention_dir / f"{stem}.png", res.crop, res.words, res.attention,
                                          res.caption))
        rows.append({"image": str(path), "caption": res.caption, "words": res.words, "score": res.score,
                     "attention_map": png})
        if not as_json:
            click.echo(f"{path}: {res.caption}" + (f"\n  attention map: {png}" if png else ""))
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
    if failed:
        ctx.exit(1)


# ------------------------------------------------------------------------------------------------ serve
@main.command("serve")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click_options((f, "") for f in option_fields(ServeOptions))
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The backbone's state_dict file, when the checkpoint's features came from one (sha256 checked).")
@click.option("--root-path", default="", help="URL prefix a reverse proxy serves this under (e.g. /captions).")
def serve_cmd(checkpoint, weights, root_path, **settings) -> None:
    """Serve CHECKPOINT over HTTP: a captioning API (docs at /docs) and a web page at /.

    Rebuilds the backbone the checkpoint's features came from, as 'captions caption' does, and
    keeps the model loaded. Concurrent requests are captioned together in batches of up to
    --max-batch images. SIGTERM or Ctrl-C: requests in flight are answered, then it exits.
    """
    from captions.serve.server import serve

    serve(checkpoint, ServeOptions(**settings), weights=weights, root_path=root_path)


# ------------------------------------------------------------------------------------------------- demo
@main.command("demo")
@click.option("--out", default=Path("demo-output"), show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="The demo's folder (created; a previous demo run there is replaced).")
@click.option("--num-images", default=",".join(map(str, DemoOptions().num_images)), show_default=True,
              help="train,val,test image counts.")
@click_options((f, "") for f in option_fields(DemoOptions))
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_cmd(out, num_images, quiet, **kwargs) -> None:
    """Run the whole pipeline offline, from scratch, on the synthetic shapes set.

    Generates and prepares the set, extracts features, trains an attention decoder, evaluates it on
    the test split, captions a few test images with attention maps, and prints a short report
    (also in OUT/report.txt). About 2 minutes on 2 CPU cores.
    """
    from captions.demo import format_report, run_demo

    try:
        counts = tuple(int(x) for x in num_images.split(","))
    except ValueError:
        counts = ()
    if len(counts) != 3 or min(counts) < 1:
        raise CaptionsError(f"--num-images must be three positive integers train,val,test, got '{num_images}'")
    report = run_demo(out, DemoOptions(num_images=counts, **kwargs), progress=not quiet)
    click.echo(format_report(report))

"""The ``captions`` command line: thin click wrappers over the importable stage functions."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from captions import __version__
from captions.errors import CaptionsError


class CaptionsGroup(click.Group):
    """Turns ``CaptionsError`` into ``Error: <one line>`` on stderr and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CaptionsError as e:
            raise click.ClickException(str(e)) from None


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
      train             fit an rnn / lstm / attn decoder from the cache
      evaluate, caption score a checkpoint, caption new images
    Run 'captions COMMAND --help' for the options of each.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        stream=sys.stderr, force=True)


# ---------------------------------------------------------------------------------------------- prepare
@main.command()
@click.argument("fmt", metavar="FORMAT", type=click.Choice(["coco", "flickr8k", "karpathy", "csv", "synthetic"]))
@click.argument("sources", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Prepared-dataset directory to write (created; resumable).")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Folder holding the images [default: depends on FORMAT, see README].")
@click.option("--tokenizer", default="simple", show_default=True,
              help="simple (built-in, Unicode-aware), nltk (Treebank, offline) or spacy (blank pipeline).")
@click.option("--lang", default="en", show_default=True, help="Language for --tokenizer spacy.")
@click.option("--min-count", default=5, show_default=True, type=click.IntRange(1),
              help="Keep words seen at least this often in the train split; others become <UNK>.")
@click.option("--max-length", default=16, show_default=True, type=click.IntRange(1),
              help="Clamp captions to this many words (plus <START>/<END>).")
@click.option("--image-size", default=256, show_default=True, type=click.IntRange(16),
              help="Side of the square resized images (shorter side scaled, then centre crop).")
@click.option("--val-fraction", default=0.05, show_default=True, type=click.FloatRange(0, 0.5),
              help="For sources without splits (csv, Kaggle flickr8k): share of images hashed to val.")
@click.option("--test-fraction", default=0.05, show_default=True, type=click.FloatRange(0, 0.5),
              help="Likewise for test.")
@click.option("--workers", default=-1, show_default=True, type=int, help="Resize processes (-1: all cores).")
@click.option("--num-images", default="1200,150,150", show_default=True,
              help="synthetic only: train,val,test image counts.")
@click.option("--seed", default=0, show_default=True, help="synthetic only: generator seed.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def prepare(fmt, sources, out, images, tokenizer, lang, min_count, max_length, image_size,
            val_fraction, test_fraction, workers, num_images, seed, quiet) -> None:
    """Parse captions, build the vocabulary, encode captions and resize images into OUT.

    \b
    FORMAT and SOURCE...:
      coco      captions_*.json (split from the name; images under --images, or ../ of the json)
      flickr8k  Flickr8k.token.txt (+ Flickr_8k.*Images.txt lists, found beside it) or Kaggle captions.txt
      karpathy  dataset_*.json (images at <--images or json dir>/<filepath>/<filename>)
      csv       image,caption[,split] tables (images under --images or <csv dir>/images)
      synthetic no SOURCE: generates the demo shapes set in OUT/source and prepares it
    """
    from captions.pipeline.prepare import PrepareOptions, prepare_synthetic
    from captions.pipeline.prepare import prepare as run_prepare

    if fmt == "synthetic":
        if sources:
            raise CaptionsError("synthetic takes no SOURCE (it generates its own)")
        try:
            n_train, n_val, n_test = (int(x) for x in num_images.split(","))
        except ValueError:
            raise CaptionsError(f"--num-images must be three integers train,val,test, got '{num_images}'") from None
    elif not sources:
        raise CaptionsError(f"{fmt} needs at least one SOURCE file")
    opts = PrepareOptions(tokenizer=tokenizer, lang=lang, min_count=min_count, max_length=max_length,
                          image_size=image_size, val_fraction=val_fraction, test_fraction=test_fraction)
    if fmt == "synthetic":
        manifest = prepare_synthetic(out, n_train, n_val, n_test, seed=seed, options=opts, workers=workers,
                                     progress=not quiet)
    else:
        manifest = run_prepare(fmt, list(sources), out, images=images, options=opts, workers=workers,
                               progress=not quiet)
    counts = ", ".join(f"{s} {c['images']} images / {c['captions']} captions" for s, c in manifest["counts"].items())
    click.echo(f"prepared {out}: {counts}; vocabulary {manifest['vocab_size']} tokens; "
               f"{manifest['skipped_count']} images skipped")

"""Caption metrics from pycocoevalcap: BLEU-1..4, METEOR (needs Java), ROUGE-L, CIDEr.

Inputs are already tokenized strings (space-joined tokens from ``prepare``), so the PTB tokenizer
(another Java process) is not needed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil

log = logging.getLogger("captions")
_warned_java = False


def java_available() -> bool:
    return shutil.which("java") is not None


def _scorer_inputs(references: dict[int, list[str]], predictions: dict[int, str]
                   ) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """pycocoevalcap's inputs for the predicted images that have references (empty captions
    become a placeholder word: the scorers reject empty strings)."""
    ids = [i for i in predictions if i in references]
    gts = {i: [r if r.strip() else "<empty>" for r in references[i]] for i in ids}
    res = {i: [predictions[i] if predictions[i].strip() else "<empty>"] for i in ids}
    return gts, res


def cider_defined(n_images: int) -> bool:
    """Whether CIDEr means anything for ``n_images`` scored images: its document frequencies come
    from the scored images' references, so with one image every n-gram is in every document and
    weighs log(1) = 0: CIDEr is 0 whatever the caption. Below two images it is undefined."""
    return n_images >= 2


def per_image_cider(references: dict[int, list[str]], predictions: dict[int, str]) -> dict[int, float]:
    """CIDEr of each predicted image (id -> score), with the document frequencies of the whole
    set, so that their mean is ``score_captions(...)["CIDEr"]``; for paired comparisons of runs.
    Empty when CIDEr is undefined (fewer than two images with references: ``cider_defined``)."""
    from pycocoevalcap.cider.cider import Cider

    gts, res = _scorer_inputs(references, predictions)
    if not cider_defined(len(gts)):
        return {}
    _, scores = Cider().compute_score(gts, res)
    # compute_score walks the images in the order of gts' keys
    return {i: float(v) for i, v in zip(gts, scores, strict=True)}


def score_captions(references: dict[int, list[str]], predictions: dict[int, str],
                   metrics: tuple[str, ...] = ("bleu", "meteor", "rouge", "cider"), warn: bool = True
                   ) -> dict[str, float]:
    """Corpus scores of ``predictions`` (image id -> caption) against ``references`` (id -> captions).

    Returns a dict with keys among BLEU-1..BLEU-4, METEOR, ROUGE-L, CIDEr. METEOR is left out,
    with one warning per process, when ``java`` is not on PATH. CIDEr is left out when it is
    undefined (fewer than two images: ``cider_defined``), never reported as 0; ``warn`` says so
    in a warning.
    """
    global _warned_java
    gts, res = _scorer_inputs(references, predictions)
    if not gts:
        return {}
    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their progress
        if "bleu" in metrics:
            from pycocoevalcap.bleu.bleu import Bleu

            scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
            out.update({f"BLEU-{n + 1}": float(s) for n, s in enumerate(scores)})
        if "meteor" in metrics:
            if java_available():
                from pycocoevalcap.meteor.meteor import Meteor

                scorer = Meteor()
                try:
                    out["METEOR"] = float(scorer.compute_score(gts, res)[0])
                finally:
                    with contextlib.suppress(Exception):
                        scorer.close()
            elif not _warned_java:
                _warned_java = True
                log.warning("METEOR skipped: it needs Java ('java' is not on PATH); reporting the other metrics")
        if "rouge" in metrics:
            from pycocoevalcap.rouge.rouge import Rouge

            out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        if "cider" in metrics and cider_defined(len(gts)):
            from pycocoevalcap.cider.cider import Cider

            out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        elif "cider" in metrics and warn:
            log.warning("CIDEr is undefined for %d image (its document frequencies would come from that image "
                        "alone, making every caption score 0); not reported", len(gts))
    return out

"""The backbone trained in the fine-tune phase: built as the cache recorded it, its upper blocks
trainable, fed decoded images through a DataLoader, and its features for evaluation.

Images are decoded and cropped exactly as ``extract-features`` does (``load_crops``: the
recorded resize, centre crop, mean and std); ``flip-crop`` augmentation (training batches only)
crops a random ``crop`` x ``crop`` square of the resized image instead of the centre one and
flips it horizontally with probability 1/2, seeded by (seed, epoch, step) so a resumed epoch
sees the same pixels. The features are laid out as the extractor lays them out
(``pooled_and_spatial``), so the decoder sees the cache's layout.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captions.captioner import backbone_weights_arg
from captions.errors import CaptionsError
from captions.features.backbones import Backbone, Preprocessing, build_backbone, mean_pooled
from captions.features.extract import encode_images, load_crops
from captions.features.forward import pooled_and_spatial
from captions.features.preprocess import normalize_batch
from captions.features.spec import FeatureSpec, TokenLayout
from captions.features.tuning import trainable_parameters, tuned_backbone, weights_identity
from captions.trainer.control import ignore_interrupt
from captions.trainer.phases import lr_factor

log = logging.getLogger("captions")


def flip_crop(x: torch.Tensor, crop: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 (M, 3, R, R) resized squares -> (M, 3, crop, crop): a random ``crop`` square of each,
    flipped left-right with probability 1/2 (the classic ImageNet training augmentation, Krizhevsky
    et al. 2012, without its scale jitter)."""
    out = []
    for im in x:
        top = int(torch.randint(0, im.shape[1] - crop + 1, (1,), generator=gen))
        left = int(torch.randint(0, im.shape[2] - crop + 1, (1,), generator=gen))
        im = im[:, top : top + crop, left : left + crop]
        if bool(torch.rand((), generator=gen) < 0.5):
            im = im.flip(2)
        out.append(im)
    return torch.stack(out)


class CropBatches(torch.utils.data.Dataset):
    """DataLoader items: item i -> (uint8 crops (M', 3, S, S) of ``batches[i]``'s image ids that
    could be read, in their order (None when none could), [(image id, reason)] of those that could
    not). Augmentation of item i is seeded by (``seed``, ``offset`` + i): the step within the epoch."""

    def __init__(self, paths: list[Path], batches: list[np.ndarray], prep: Preprocessing, augment: str,
                 seed: tuple[int, ...], offset: int = 0) -> None:
        self.paths, self.batches, self.prep, self.augment = paths, batches, prep, augment
        self.seed, self.offset = seed, offset

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, list[tuple[int, str]]]:
        ids = self.batches[i]
        prep = self.prep if self.augment == "none" else replace(self.prep, crop=self.prep.resize)
        _, x, failed = load_crops(self.paths, ids, prep)
        if x is None:
            return None, failed
        if self.augment == "flip-crop":
            seed = int(np.random.SeedSequence([*self.seed, self.offset + i]).generate_state(1)[0])
            x = flip_crop(x, self.prep.crop, torch.Generator().manual_seed(seed))
        return x.contiguous(memory_format=torch.channels_last), failed


class TensorStore:
    """Features of some images held in memory, read like ``FeatureStore.gather_sorted``."""

    def __init__(self, image_ids: np.ndarray, feats: torch.Tensor, device: torch.device) -> None:
        self.pos = {int(i): k for k, i in enumerate(image_ids)}
        self.feats, self.device = feats, device

    def covering(self, image_ids: np.ndarray, rows: np.ndarray, image_of_row: np.ndarray) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
        """The ``image_ids`` (B,) and caption ``rows`` (R,) (of images ``image_of_row[rows]``) whose
        image this store holds."""
        held = np.fromiter(self.pos, dtype=np.int64, count=len(self.pos))
        return image_ids[np.isin(image_ids, held)], rows[np.isin(image_of_row[rows], held)]

    def gather_sorted(self, image_ids: np.ndarray) -> torch.Tensor:
        """image ids (B,) -> features (B, ...) float32 on the device."""
        idx = torch.tensor([self.pos[int(i)] for i in image_ids], dtype=torch.int64)
        return self.feats.index_select(0, idx).to(self.device).float()


def training_weights_arg(identity: str, weights: str | None) -> str:
    """``backbone_weights_arg`` for ``captions train``: its errors name ``--encoder-weights`` and
    the cache rather than ``--weights`` and a checkpoint."""
    try:
        return backbone_weights_arg(identity, weights or None)
    except CaptionsError as e:
        text = str(e).replace("--weights", "--encoder-weights").replace("the checkpoint's", "the cache's")
        raise CaptionsError(text) from None


class TunedEncoder:
    """The recorded backbone with its blocks from ``from_block`` on trainable, its Adam optimizer
    (``lr``, cosine-decayed over ``total_steps``) and scheduler.

    ``spec``: the cache's feature spec (which backbone, weights, size, preprocessing); ``weights``:
    the state_dict file its features came from, when they came from one (sha256 checked);
    ``state``: a fine-tuned library-model state_dict to start from instead (``--init-from`` of a
    fine-tuned checkpoint). Raises ``CaptionsError`` when the backbone cannot be rebuilt as the
    cache recorded it.
    """

    def __init__(self, spec: FeatureSpec, device: torch.device, from_block: int, lr: float, total_steps: int,
                 weights: str | None = None, state: dict[str, torch.Tensor] | None = None) -> None:
        self.spec, self.device = spec, device
        if state is not None:
            bb = tuned_backbone(spec.backbone, spec.image_size, state, weights_identity(state))
        else:
            bb = build_backbone(spec.backbone, training_weights_arg(spec.weights, weights), spec.image_size)
        if TokenLayout.parse(spec.token_layout).pooled == "mean":
            bb = mean_pooled(bb)
        if bb.channels != spec.channels or tuple(bb.grid) != tuple(spec.spatial_shape):
            raise CaptionsError(f"backbone {spec.backbone} as built now gives {bb.channels} channels on a "
                                f"{bb.grid} grid, the cache {spec.channels} on {tuple(spec.spatial_shape)}")
        self.bb: Backbone = bb
        self.model = bb.model if bb.model is not None else bb.module
        self.prep = Preprocessing.from_dict(spec.preprocessing)  # what extraction did
        self.params = trainable_parameters(bb, from_block)
        self.from_block = from_block
        bb.module.to(device)
        if device.type == "cpu":  # as extraction measured: channels_last convolutions are faster on CPU too
            bb.module.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.params, lr=lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor("cosine", step, total_steps))
        log.info("fine-tuning %s from block %d: %d of %d parameters train", spec.backbone, from_block,
                 sum(p.numel() for p in self.params), sum(p.numel() for p in self.model.parameters()))

    def features(self, crops: torch.Tensor, spatial: bool, autocast) -> torch.Tensor:
        """uint8 crops (M, 3, S, S) -> float32 features, (M, h*w, C) when ``spatial`` else (M, C),
        with the graph of the trainable blocks; ``autocast``: the run's autocast context."""
        x = normalize_batch(crops.to(self.device, non_blocking=True), self.prep, torch.float32)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            out = self.bb.module(x)
        feats, pooled = pooled_and_spatial(out, torch.float32)
        return feats if spatial else pooled

    def loader(self, paths: list[Path], batches: list[np.ndarray], augment: str, workers: int,
               seed: tuple[int, ...], offset: int = 0) -> torch.utils.data.DataLoader:
        """Crops of ``batches`` (image-id arrays) in order, decoded by ``workers`` processes;
        ``offset``: the step of ``batches[0]`` in its epoch (it seeds the augmentation)."""
        return torch.utils.data.DataLoader(
            CropBatches(paths, batches, self.prep, augment, seed, offset), batch_size=None, shuffle=False,
            num_workers=workers, prefetch_factor=2 if workers else None, persistent_workers=False,
            worker_init_fn=ignore_interrupt if workers else None,
            generator=torch.Generator().manual_seed(0))  # else the loader draws from the run's RNG

    @torch.no_grad()
    def store(self, paths: list[Path], image_ids: np.ndarray, spatial: bool, batch_size: int = 32) -> TensorStore:
        """Features of ``image_ids`` (centre crops, no augmentation) rounded through the cache's
        dtype, as a ``TensorStore`` (for the val evaluation of fine-tune epochs)."""
        dtype = torch.float16 if self.spec.dtype == "float16" else torch.float32
        ids, feats = encode_images(
            paths, image_ids, self.prep,
            lambda x: self.features(x, spatial, torch.autocast("cpu", enabled=False)).to(dtype),
            batch_size, "left out of this epoch's val scores")
        if feats is None:
            raise CaptionsError("none of the val images can be read any more; they were readable at extraction",
                                paths[int(image_ids[0])].parent)
        return TensorStore(ids, feats, self.device)

    def weights(self) -> dict[str, torch.Tensor]:
        """The library model's weights, all of them, as contiguous CPU tensors (strict-loadable)."""
        return {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint carries: the library model's weights (all of them, strict-loadable),
        their identity, the first trained block, optimizer and scheduler states."""
        weights = self.weights()
        return {"state_dict": weights, "identity": weights_identity(weights), "from_block": self.from_block,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` output."""
        self.model.load_state_dict(d["state_dict"])
        self.optimizer.load_state_dict(d["optimizer"])
        self.scheduler.load_state_dict(d["scheduler"])

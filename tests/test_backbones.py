"""Every backbone family end to end: one small model per family (torchvision CNNs, Swin and ViT;
timm ViT, DeiT with a distillation token, DINOv2 with registers, Swin, LeViT, ConvNeXt; an
open_clip CLIP tower), random weights, a small image size. Each extracts a cache whose grid and
pooled vector match a direct call of the library's own model, trains an attn decoder on it for
one epoch and captions an image through ``captions caption``. Plus the name catalogue
(``captions backbones``), one-line refusals and weights files of another image size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from captions.errors import CaptionsError
from captions.features.backbones import build_backbone, mean_pooled
from captions.features.cache import FeatureCache
from captions.features.extract import ExtractOptions, extract_features
from captions.features.spec import TokenLayout
from captions.pipeline.prepare import PrepareOptions, prepare
from captions.pipeline.prepared import load_prepared
from tests.conftest import cli, write_image

PREFIX = "grid;prefix={}:dropped;pooled=model"
# name, image size (the smallest that leaves a grid of more than one cell), expected grid, token layout
MODELS = [
    ("resnet18", 64, (2, 2), "grid"),
    ("efficientnet_b0", 64, (2, 2), "grid"),
    ("mobilenet_v3_small", 64, (2, 2), "grid"),
    ("convnext_tiny", 64, (2, 2), "grid"),
    ("swin_t", 64, (2, 2), "grid"),
    ("vit_b_16", 64, (4, 4), PREFIX.format(1)),
    ("timm/vit_tiny_patch16_224", 64, (4, 4), PREFIX.format(1)),
    ("timm/deit_tiny_distilled_patch16_224", 64, (4, 4), PREFIX.format(2)),  # class + distillation token
    ("timm/vit_small_patch14_reg4_dinov2", 56, (4, 4), PREFIX.format(5)),  # class + 4 registers
    ("timm/swin_tiny_patch4_window7_224", 64, (2, 2), "grid"),  # channels-last output
    ("timm/levit_128s", 128, (2, 2), "grid"),  # tokens without prefix; its head is the mean
    ("timm/convnext_atto", 64, (2, 2), "grid;pooled=model"),  # the head norms the pooled vector
    ("open_clip/ViT-B-32:openai", 64, (2, 2), PREFIX.format(1) + ";projected"),
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Eight photos-to-be (random pixels, 6 train / 2 val), two captions each, stored at 64 px."""
    root = tmp_path_factory.mktemp("bb")
    rows = []
    for i in range(8):
        write_image(root / "raw" / "images" / f"im{i}.png", size=(70 + 3 * i, 64), seed=i)
        split = "val" if i in (3, 6) else "train"
        rows += [f"im{i}.png,a picture with {'red' if i % 2 else 'blue'} things,{split}",
                 f"im{i}.png,another picture of {'red' if i % 2 else 'blue'},{split}"]
    (root / "raw" / "captions.csv").write_text("image,caption,split\n" + "\n".join(rows) + "\n")
    prepare("csv", [root / "raw" / "captions.csv"], root / "prep",
            options=PrepareOptions(min_count=1, image_size=64), progress=False)
    return root / "prep"


def reference_input(prepared_dir, prep) -> torch.Tensor:
    """The stored images through torchvision's transforms (not the extraction's own code)."""
    from torchvision import transforms as T

    interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[prep.interpolation]
    tf = T.Compose([T.Resize(prep.resize, interpolation=interp), T.CenterCrop(prep.crop), T.ToTensor(),
                    T.Normalize(prep.mean, prep.std)])
    ds = load_prepared(prepared_dir)
    return torch.stack([tf(Image.open(ds.image_path(i)).convert("RGB")) for i in range(len(ds.images))])


def hooked(model, module_name: str, x: torch.Tensor, take: str = "input"):
    """Run ``model(x)`` (its whole forward, classifier included) and return what ``module_name``
    received (``input``) or gave (``output``)."""
    seen = {}

    def hook(_m, args, out):
        seen["v"] = args[0] if take == "input" else out

    handle = model.get_submodule(module_name).register_forward_hook(hook)
    try:
        model(x)
    finally:
        handle.remove()
    return seen["v"]


def direct_call(name: str, model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid (N, h*w, C), pooled (N, C)) straight from the library's model, written per family."""
    rows = lambda fmap: fmap.flatten(2).transpose(1, 2)  # noqa: E731  (N, C, h, w) -> (N, h*w, C)
    if name == "vit_b_16":
        tokens = hooked(model, "encoder", x, "output")
        assert torch.equal(hooked(model, "heads", x), tokens[:, 0])  # the class token is what it classifies
        return tokens[:, 1:], tokens[:, 0]
    if "/" not in name:  # torchvision CNNs and Swin: the map their global average pooling takes
        fmap = hooked(model, "avgpool", x)
        return rows(fmap), hooked(model, "avgpool", x, "output").flatten(1)
    if name.startswith("open_clip/"):
        model.output_tokens = True
        pooled, tokens = model(x)
        return tokens @ model.proj, pooled
    feats = model.forward_features(x)
    pooled = model.forward_head(feats, pre_logits=True)
    if feats.ndim == 4:
        return (feats.flatten(1, 2) if name.startswith("timm/swin") else rows(feats)), pooled
    return feats[:, model.num_prefix_tokens if hasattr(model, "num_prefix_tokens") else 0 :], pooled


def close(got: np.ndarray, want: torch.Tensor, what: str) -> None:
    want = want.detach().float().numpy()
    assert got.shape == want.shape, what
    scale = float(np.abs(want).max())
    # the extraction's own resize (torch's antialiased bilinear) beside PIL's, BatchNorm folding
    # (float32: random-init EfficientNet features are ~1e-14, below float16's range)
    np.testing.assert_allclose(got, want, rtol=5e-3, atol=5e-3 * scale, err_msg=what)


@pytest.mark.parametrize(("name", "size", "grid", "layout"), MODELS, ids=[m[0] for m in MODELS])
def test_family_extracts_trains_and_captions(tmp_path, prepared, name, size, grid, layout):
    cache_path = extract_features(prepared, tmp_path / "c.h5",
                                  ExtractOptions(backbone=name, weights="none", image_size=size, batch_size=4,
                                                 workers=0, precision="fp32", dtype="float32"), progress=False)
    bb = build_backbone(name, "none", size)
    with torch.inference_mode():
        want_grid, want_pooled = direct_call(name, bb.model, reference_input(prepared, bb.preprocessing))
    with FeatureCache(cache_path) as cache:
        assert (cache.spec.spatial_shape, cache.spec.token_layout, cache.spec.channels) == (grid, layout, bb.channels)
        close(cache.spatial[:].astype(np.float32), want_grid, "grid")
        close(cache.pooled[:].astype(np.float32), want_pooled, "pooled")

    run = tmp_path / "run"
    r = cli("train", "attn", "--data", prepared, "--features", cache_path, "--out", run, "--epochs", 1,
            "--scst-epochs", 0, "--batch-size", 16, "--embed-dim", 8, "--hidden-dim", 16, "--attention-dim", 16,
            "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.output
    image = load_prepared(prepared).image_path(3)
    r = cli("caption", image, "--checkpoint", run / "best.pt", "--beam-size", 1, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output[r.output.index("["):])
    assert rows[0]["image"] == str(image) and rows[0]["words"], rows


def test_token_layout_round_trip_and_refusal():
    for text in ("grid", "grid;pooled=model", "grid;prefix=5:dropped;pooled=model", PREFIX.format(1) + ";projected"):
        assert str(TokenLayout.parse(text)) == text
    assert TokenLayout.parse("grid") == TokenLayout()
    with pytest.raises(CaptionsError, match="unknown token layout 'tokens'"):
        TokenLayout.parse("tokens")


def test_older_layout_is_rebuilt_with_the_mean():
    """A checkpoint from before pooled=model existed gets the mean over the grid, as then."""
    bb = build_backbone("timm/convnext_atto", "none", 64)
    assert bb.token_layout == "grid;pooled=model"
    old = mean_pooled(bb)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        fmap, _ = bb.module(x)
        again = old.module(x)
    assert old.token_layout == "grid" and torch.equal(again, fmap)


@pytest.mark.parametrize(("name", "hint"), [("vit_b16", "vit_b_16"),
                                            ("timm/vit_tiny_patch16", "timm/vit_tiny_patch16_224"),
                                            ("open_clip/ViT-B-32:opena", "open_clip/ViT-B-32:openai"),
                                            ("open_clip/ViT-B-33", "open_clip/ViT-B-32")])
def test_unknown_names_get_one_line_with_close_matches(prepared, name, hint):
    r = cli("extract-features", prepared, "--backbone", name, "--weights", "none")
    assert r.exit_code == 1 and "close matches:" in r.output and hint in r.output.split("close matches:")[1]
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_a_model_made_for_one_size_is_refused_naming_it():
    with pytest.raises(CaptionsError, match=r"maxvit_t does not run at --image-size 64 .*made for --image-size 224"):
        build_backbone("maxvit_t", "none", 64)


def test_backbones_command_lists_channels_grid_and_weights():
    r = cli("backbones", "vit_b_16")
    assert r.exit_code == 0, r.output
    assert r.output.split() == ["vit_b_16", "768", "14x14", "@224", "torchvision:ViT_B_16_Weights.IMAGENET1K_V1"]
    r = cli("backbones", "timm/deit_tiny_distilled*")
    assert r.output.split()[:4] == ["timm/deit_tiny_distilled_patch16_224", "192", "14x14", "@224"]
    assert "hf-hub:timm/deit_tiny_distilled_patch16_224" in r.output
    r = cli("backbones", "open_clip/ViT-B-32:openai")
    assert r.output.split()[:4] == ["open_clip/ViT-B-32:openai", "512", "7x7", "@224"]
    r = cli("backbones", "vit_b16")
    assert r.exit_code == 1 and "no backbone name matches 'vit_b16'; close matches: vit_b_16" in r.output


def test_weights_files_of_another_size_are_resampled(tmp_path):
    """A state_dict saved at the model's own size loads at --image-size 64 through the library's
    converters (timm's checkpoint_filter_fn, open_clip's resize_pos_embed), with its sha256 as identity."""
    import timm

    torch.manual_seed(1)
    path = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), path)
    bb = build_backbone("timm/vit_tiny_patch16_224", str(path), 64)
    assert bb.weights.startswith("sha256:") and bb.grid == (4, 4)
    assert bb.model.pos_embed.shape[1] == 1 + 16

    clip = build_backbone("open_clip/ViT-S-32", "none", 96)  # 3x3 patches, saved with a whole CLIP's key names
    path = tmp_path / "clip.pth"
    torch.save({f"visual.{k}": v for k, v in clip.model.state_dict().items()}, path)
    again = build_backbone("open_clip/ViT-S-32", str(path), 64)
    assert again.weights.startswith("sha256:") and again.grid == (2, 2) and again.channels == 384
    assert torch.equal(again.model.conv1.weight, clip.model.conv1.weight)
    assert again.model.positional_embedding.shape[0] == 1 + 4


def test_offline_default_clip_weights_say_what_to_do(prepared, monkeypatch):
    import open_clip.factory

    def offline(*a, **k):  # the network edge: open_clip's download with no internet
        raise OSError("Name or service not known")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    r = cli("extract-features", prepared, "--backbone", "open_clip/ViT-B-32:openai")
    assert r.exit_code == 1 and "--weights PATH" in r.output and "--weights none" in r.output
    r = cli("extract-features", prepared, "--backbone", "open_clip/ViT-B-32")
    assert r.exit_code == 1 and "names no pretrained tag" in r.output and "openai" in r.output


def test_default_timm_weights_are_resampled_or_refused_naming_the_size(monkeypatch):
    """timm's pretrained weights, as its hub download would hand them over (at 224 px): a ViT's
    position embeddings are resampled for --image-size 64; LeViT's attention biases cannot be,
    and that is one line naming the size it needs."""
    import timm
    import timm.models._builder

    def hub(model_id, *a, **k):  # the network edge: the weights file a download would give
        with torch.random.fork_rng():
            return timm.create_model(model_id.split("/")[1].split(".")[0]).state_dict()

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", hub)
    bb = build_backbone("timm/vit_tiny_patch16_224", "default", 64)
    assert bb.weights == "timm:timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k" and bb.grid == (4, 4)
    with pytest.raises(CaptionsError, match=r"levit_128s do not fit --image-size 128 .*use --image-size 224$"):
        build_backbone("timm/levit_128s", "default", 128)

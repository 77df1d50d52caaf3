"""The library's shape: each layer imports only from the layers below it (README, "Layout"), the
commands' help needs no torch, and no library function grows past a screenful."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "captions"

# lowest first; a module may import from its own layer and the ones above it in this list
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("captions.errors", "captions.fsutil", "captions.options", "captions.runtime", "captions.distributed",
              "captions.cider", "captions.metrics", "captions.attention_maps")),
    ("data and pipeline", ("captions.data", "captions.pipeline")),
    ("features", ("captions.features",)),
    ("models", ("captions.models",)),
    ("generation", ("captions.generation",)),
    ("trainer, evaluation, captioner", ("captions.trainer", "captions.evaluation", "captions.captioner",
                                        "captions.baseline")),
    ("command line", ("captions.cli", "captions.demo", "captions.__main__", "captions.serve")),
]
MAX_FUNCTION_LINES = 80


def layer_of(module: str) -> int:
    matches = [(len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
               if module == p or module.startswith(p + ".")]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and the README's layout)")
    return max(matches)[1]


def library_modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "captions":  # the package's lazy entry points name the top layers on purpose
            out.append((name, path))
    return out


def captions_imports(path: Path, module: str) -> set[str]:
    """Every captions module imported anywhere in the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("captions")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("captions"):
            found.add(node.module)
    return {m for m in found if m != "captions"}


def test_no_layer_imports_a_higher_one() -> None:
    wrong = []
    for module, path in library_modules():
        own = layer_of(module)
        for target in sorted(captions_imports(path, module)):
            if layer_of(target) > own:
                wrong.append(f"{module} ({LAYERS[own][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not wrong, "\n".join(wrong)


def test_the_layering_check_catches_an_upward_import(tmp_path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from captions.trainer.train import train\n")
    assert "captions.trainer.train" in captions_imports(bad, "captions.pipeline.x")
    assert layer_of("captions.trainer.train") > layer_of("captions.pipeline.x")


def test_no_library_function_is_longer_than_a_screen() -> None:
    long = []
    for module, path in library_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, "\n".join(long)


def test_help_imports_no_torch() -> None:
    code = ("import sys\nfrom captions.cli import main\n"
            "for args in (['--help'], ['evaluate', '--help'], ['train', '--help'], ['caption', '--help'],\n"
            "             ['demo', '--help'], ['prepare', '--help'], ['serve', '--help']):\n"
            "    main(args, standalone_mode=False)\n"
            "print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "TORCH False" in out and out.count("Usage:") == 7, out


def test_entry_points_are_lazy_and_evaluation_never_loads_backbone_code() -> None:
    code = ("import sys, captions\nprint('torch' in sys.modules)\n"
            "import captions.evaluation, captions.trainer.train\n"
            "print(sorted(m for m in ('captions.features.backbones', 'captions.captioner', 'timm', 'torchvision')"
            " if m in sys.modules))\n"
            "for name in ('prepare', 'extract_features', 'FeatureCache', 'train', 'evaluate', 'Captioner'):\n"
            "    assert callable(getattr(captions, name)) and getattr(captions, name).__doc__, name\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:3] == ["False", "[]", "ok"], out

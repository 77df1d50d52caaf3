"""The command line itself: help texts show the library's defaults, and start-up needs no torch."""

from __future__ import annotations

import re
import subprocess
import sys

from click.testing import CliRunner

from captions.cli import main
from captions.trainer.config import TrainConfig


def test_train_help_shows_the_trainconfig_defaults() -> None:
    result = CliRunner().invoke(main, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    cfg = TrainConfig()
    for option, value in [("--epochs", cfg.epochs), ("--patience", cfg.patience), ("--lr", cfg.lr),
                          ("--scst-epochs", cfg.scst_epochs), ("--label-smoothing", cfg.label_smoothing)]:
        # the option's entry: its line and the wrapped lines under it, up to the next option
        entry = re.search(rf"\n  {option} [A-Z].*?(?=\n  -|\Z)", result.output, re.S).group()
        assert re.search(rf"\[default:\s+{re.escape(str(value))}[;\]]", entry), entry


def test_the_command_line_starts_without_importing_torch() -> None:
    code = "import sys, captions.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

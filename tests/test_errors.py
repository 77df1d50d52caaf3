"""The one-line reasons that error messages quote from library exceptions."""

import errno
import zipfile

import pytest

from captions.errors import error_text, first_line, os_reason, torch_load_reason


@pytest.mark.parametrize(("exc", "expected"), [
    (ValueError("bad header\n  at byte 12"), "bad header"),
    (ValueError("\n   \n  indented reason  \nmore"), "indented reason"),
    (RuntimeError(""), "RuntimeError"),          # an empty message must not raise IndexError
    (RuntimeError("  \n "), "RuntimeError"),
    (KeyError("x"), "'x'"),
])
def test_first_line_is_the_first_non_blank_line_else_the_type(exc, expected):
    assert first_line(exc) == expected


def test_first_line_default_replaces_the_type_name():
    assert first_line(OSError(), "no detail") == "no detail"
    assert first_line(OSError("disk gone"), "no detail") == "disk gone"


def test_os_reason_prefers_the_errno_text():
    assert os_reason(OSError(errno.ENOSPC, "whatever")) == "No space left on device"
    assert os_reason(RuntimeError("H5 write failed (errno = 28, ...)")) == "No space left on device"
    assert os_reason(RuntimeError("\nsecond line only")) == "second line only"


def test_error_text_joins_lines_and_cuts_long_messages():
    assert error_text(RuntimeError("Error(s) in loading:\n\tMissing key(s): a.b")) == \
        "Error(s) in loading: Missing key(s): a.b"
    assert error_text(RuntimeError("x" * 400), limit=10) == "x" * 10 + "…"
    assert error_text(RuntimeError("")) == "RuntimeError"


def _load_reason(path):
    import torch

    try:
        torch.load(path, weights_only=True)
    except Exception as e:
        return torch_load_reason(e, path.stat().st_size)
    raise AssertionError(f"{path} loaded")


def test_torch_load_reason_names_what_is_wrong_with_the_file(tmp_path):
    from fractions import Fraction

    import torch

    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(4096)}, good)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "half.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"cfg": Fraction(1, 2)}, tmp_path / "objects.pt")  # a Python object: refused by the safe load
    (tmp_path / "text.pt").write_bytes(b"not a checkpoint at all\n")
    assert _load_reason(tmp_path / "empty.pt") == "an empty file"
    half = _load_reason(tmp_path / "half.pt")
    assert half.startswith("truncated or damaged") and "If you are seeing this error" not in half
    with zipfile.ZipFile(tmp_path / "zip.pt", "w") as z:  # a zip, but not torch.save's layout
        z.writestr("notes.txt", "hello")
    assert _load_reason(tmp_path / "zip.pt") == "truncated or damaged, or a zip file that torch.save did not write"
    assert "does not run" in _load_reason(tmp_path / "objects.pt")
    assert _load_reason(tmp_path / "text.pt") == "not a file that torch.save wrote"


def test_a_torch_file_that_captions_did_not_write_is_named_as_such(tmp_path):
    import torch

    from captions.errors import CaptionsError
    from captions.models.checkpoint import load_checkpoint

    torch.save({"weight": torch.zeros(2)}, tmp_path / "weights.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CaptionsError, match=r"weights.pt: not a captions checkpoint \(a torch file holding a "
                                            r"state_dict or other mapping, not one that 'captions train' wrote\)"):
        load_checkpoint(tmp_path / "weights.pt")
    with pytest.raises(CaptionsError, match=r"list.pt: not a captions checkpoint \(a torch file holding a list,"):
        load_checkpoint(tmp_path / "list.pt")

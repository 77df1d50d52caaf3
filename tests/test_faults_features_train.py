"""Faults in extract-features, train and evaluate, through the command line as a user meets them.

A kill at every write boundary (the ``CAPTIONS_FAULT`` hook, ``captions.fsutil.fault_point``: the
boundaries are listed by tracing an uninterrupted run) and at random moments, each resumed and
compared with the uninterrupted run (HDF5 arrays and attributes, weights, every metrics row,
the files left); a full disk and a read-only one (a small tmpfs where this user can mount one,
else an injected ENOSPC and a read-only folder); two writers at once.

Each run is a child process forked from a server that imported torch once (multiprocessing's
forkserver), so a kill is a real one and a case costs a fork instead of an import.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from captions.features.cache import read_attrs
from captions.fsutil import FAULT_ENV, FAULT_EXIT, FAULT_TRACE_ENV, output_lock
from captions.pipeline.prepare import PrepareOptions, prepare_synthetic

EXTRACT = ["--backbone", "resnet18", "--weights", "none", "--image-size", 32, "--dtype", "float32", "--workers", 0,
           "--batch-size", 8, "--chunk-rows", 8, "--precision", "fp32", "--quiet"]
TRAIN = ["lstm", "--device", "cpu", "--epochs", 2, "--scst-epochs", 1, "--scst-start", "loss", "--batch-size", 16,
         "--embed-dim", 8, "--hidden-dim", 16, "--lr", 3e-3, "--checkpoint-every", 3, "--eval-batch-size", 64,
         "--precision", "fp32", "--quiet"]
TIMING = ("time_s", "captions_per_s", "decode_seconds")


def _child(args: list[str], env: dict[str, str], log: str, keep_worker_fds: bool) -> None:
    """A ``captions ARGS`` run in this forked process, its output in ``log``."""
    import shutil

    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    which = shutil.which  # METEOR would start Java (5-10 s): scored without it, as the no_java fixture does
    shutil.which = lambda name, *a, **k: None if name == "java" else which(name, *a, **k)
    # DataLoader workers start as in a command-line run (this process came from the fork server)
    multiprocessing.set_start_method("fork", force=True)
    if keep_worker_fds:  # as before the fix: DataLoader workers keep the cache's descriptor
        import captions.features.extract as extract

        extract.forget_descriptors = _keep_descriptors
    from captions.cli import main

    main(args, prog_name="captions")


def _keep_descriptors(fds: tuple[int, ...], worker_id: int) -> None:
    """A DataLoader worker_init_fn that leaves the inherited descriptors open."""


class Runs:
    """Starts ``captions`` runs as forked child processes."""

    def __init__(self, root: Path) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        # what a run would import lazily (torch._dynamo with the first optimizer, torchvision with
        # the backbone) is imported here once
        self.ctx.set_forkserver_preload(["torch._dynamo", "torchvision.models", "captions.cli",
                                         "captions.features.extract", "captions.trainer.train", "captions.evaluation",
                                         "tests.test_faults_features_train"])
        self.root, self.count = root, itertools.count()

    def start(self, *args, fault: str | None = None, trace: Path | None = None, keep_worker_fds: bool = False):
        env = {FAULT_ENV: fault or "", FAULT_TRACE_ENV: str(trace or "")}
        log = self.root / f"log-{next(self.count)}.txt"
        log.touch()
        p = self.ctx.Process(target=_child, args=([str(a) for a in args], env, str(log), keep_worker_fds))
        p.start()
        p.log = log
        return p

    def run(self, *args, **kw) -> tuple[int, str]:
        """(exit status, output) of a run that is waited for."""
        p = self.start(*args, **kw)
        p.join(180)
        assert p.exitcode is not None, f"captions {' '.join(map(str, args))} did not end"
        return p.exitcode, p.log.read_text()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic set (12/4/4 images at 32 px), and the runs the faulted ones must equal:
    extract-features, train and evaluate, uninterrupted, with their write boundaries traced."""
    root = tmp_path_factory.mktemp("faults")
    runs = Runs(root)
    data = root / "data"
    prepare_synthetic(data, 12, 4, 4, workers=1, progress=False, options=PrepareOptions(min_count=1, image_size=32))
    ref, traces = root / "ref", {}
    ref.mkdir()
    assert runs.run("--version")[0] == 0  # the fork server starts (and imports torch) before the timed runs
    for stage, args in (("extract", ["extract-features", data, "--out", ref / "f.h5", *EXTRACT]),
                        ("train", ["train", *TRAIN, "--data", data, "--features", ref / "f.h5", "--out", ref / "run"]),
                        ("evaluate", ["evaluate", ref / "run" / "best.pt", "--data", data, "--features", ref / "f.h5",
                                      "--out", ref / "eval", "--beam-size", 2, "--quiet"])):
        t0 = time.perf_counter()
        code, out = runs.run(*args, trace=root / f"{stage}.trace")
        assert code == 0, out
        traces[stage] = ((root / f"{stage}.trace").read_text().split(), time.perf_counter() - t0)
    return {"root": root, "runs": runs, "data": data, "ref": ref, "traces": traces}


def cache_content(path: Path) -> tuple[dict, dict]:
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in f}, {k: v for k, v in read_attrs(f).items() if k != "created"}


def assert_same_cache(path: Path, ref: Path, exact: bool = True) -> None:
    """The same arrays (bit for bit where the batches were the same) and attributes, and no
    partial file left beside it."""
    (arrays, attrs), (ref_arrays, ref_attrs) = cache_content(path), cache_content(ref)
    assert attrs == ref_attrs and arrays.keys() == ref_arrays.keys()
    for k in arrays:
        if exact or arrays[k].dtype.kind != "f":
            np.testing.assert_array_equal(arrays[k], ref_arrays[k], err_msg=k)
        else:
            np.testing.assert_allclose(arrays[k], ref_arrays[k], rtol=1e-5, atol=1e-6, err_msg=k)
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path]
    assert not leftovers, leftovers


def run_content(run: Path) -> tuple[list[dict], list[str], dict]:
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]
    files = sorted(p.name for p in run.iterdir() if not p.name.startswith(".train.lock"))
    ckpts = {p.name: torch.load(p, weights_only=True) for p in sorted(run.glob("*.pt"))}
    return rows, files, ckpts


def same(a, b) -> bool:
    """``a`` equals ``b``, floats within 1e-6 relative, in nested dicts, lists and tuples."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) or isinstance(b, float):
        return b == pytest.approx(a, rel=1e-6, abs=1e-9)
    return a == b


def assert_same_run(run: Path, ref: Path) -> None:
    (rows, files, ckpts), (ref_rows, ref_files, ref_ckpts) = run_content(run), run_content(ref)
    assert files == ref_files  # no staged or temporary file left behind
    assert [r.keys() for r in rows] == [r.keys() for r in ref_rows]
    for row, want in zip(rows, ref_rows, strict=True):  # train_loss and train_reward over the whole epoch
        assert same(row, want), (row, want)
    keys = ("epoch", "step_in_epoch", "best", "lowest_val_loss", "scst_from")  # metrics_bytes: row times vary
    for name, ckpt in ckpts.items():
        want = ref_ckpts[name]
        assert same([ckpt[k] for k in keys], [want[k] for k in keys]), name
        for k, v in want["state_dict"].items():
            torch.testing.assert_close(ckpt["state_dict"][k], v, rtol=1e-6, atol=1e-7, msg=f"{name} {k}")
    assert json.loads((run / "config.json").read_text()) == json.loads((ref / "config.json").read_text())


def eval_content(folder: Path) -> tuple[dict, list]:
    metrics = json.loads((folder / "metrics.json").read_text())
    return ({k: v for k, v in metrics.items() if k not in (*TIMING, "predictions")},
            json.loads((folder / "predictions.json").read_text()))


def stage_args(w: dict, stage: str, case: Path) -> list:
    """The command line of ``stage`` writing into folder ``case`` (its inputs from the reference)."""
    ref = w["ref"]
    return {"extract": ["extract-features", w["data"], "--out", case / "f.h5", *EXTRACT],
            "train": ["train", *TRAIN, "--data", w["data"], "--features", ref / "f.h5", "--out", case / "run"],
            "evaluate": ["evaluate", ref / "run" / "best.pt", "--data", w["data"], "--features", ref / "f.h5",
                         "--out", case / "eval", "--beam-size", 2, "--quiet"]}[stage]


def resume_args(stage: str, args: list) -> list:
    return [*args, "--resume"] if stage == "train" else args


def check_resumed(w: dict, stage: str, case: Path) -> None:
    ref = w["ref"]
    if stage == "extract":
        assert_same_cache(case / "f.h5", ref / "f.h5")
    elif stage == "train":
        assert_same_run(case / "run", ref / "run")
    else:
        assert eval_content(case / "eval") == eval_content(ref / "eval")


def epochs_of(points: list[str]) -> list[int]:
    """The epoch (0-based) each train boundary belongs to: an epoch ends with its commit and the
    moves that follow it."""
    epoch, committed, out = 0, False, []
    for p in points:
        if committed and not p.startswith("train:applied:"):
            epoch, committed = epoch + 1, False
        out.append(epoch)
        committed = committed or p.startswith("train:commit:")
    return out


@pytest.mark.parametrize("stage", ["extract", "train", "evaluate"])
def test_a_kill_at_every_write_boundary_resumes_to_the_uninterrupted_result(world, stage, request):
    """Every boundary of extract-features (3 chunks) and evaluate; of train, those of the first
    (cross-entropy) epoch and the last (self-critical) one, each with a periodic checkpoint, the
    middle epoch repeating the first's (all of them with --runslow)."""
    points, _ = world["traces"][stage]
    assert len(points) >= {"extract": 9, "train": 20, "evaluate": 2}[stage], points
    if stage == "train" and not request.config.getoption("--runslow"):
        epochs = epochs_of(points)
        points = [p for p, e in zip(points, epochs, strict=True) if e in (0, epochs[-1])]
    for i, point in enumerate(points):
        case = world["root"] / f"{stage}-at-{i}"
        args = stage_args(world, stage, case)
        code, out = world["runs"].run(*args, fault=point)
        assert code == FAULT_EXIT, f"{point}: {out}"
        code, out = world["runs"].run(*resume_args(stage, args))
        assert code == 0, f"after {point}: {out}"
        check_resumed(world, stage, case)


@pytest.mark.parametrize("stage", ["extract", "train"])
def test_a_kill_at_random_moments_resumes_to_the_uninterrupted_result(world, stage):
    _, seconds = world["traces"][stage]
    rng, killed = random.Random(18), 0
    for i in range(3):
        case = world["root"] / f"{stage}-random-{i}"
        args = stage_args(world, stage, case)
        p = world["runs"].start(*args)
        time.sleep(rng.uniform(0.05, 0.9 * seconds))
        with contextlib.suppress(ProcessLookupError):  # already done
            os.kill(p.pid, signal.SIGKILL)
        p.join(60)
        killed += p.exitcode == -signal.SIGKILL
        code, out = world["runs"].run(*resume_args(stage, args))
        assert code == 0, out
        check_resumed(world, stage, case)
    assert killed, "every run ended before its kill"


def test_a_killed_extraction_whose_worker_lives_on_is_resumed_not_restarted(world):
    """--workers 1: the killed run's DataLoader worker lives on for a few seconds; the re-run
    started at once keeps the finished chunks (before: 'unreadable', deleted, all recomputed)."""
    for keep_fds in (False, True):  # True: as if the worker still held the file (the re-run waits)
        case = world["root"] / f"worker-{keep_fds}"
        args = ["extract-features", world["data"], "--out", case / "f.h5", *EXTRACT, "--workers", 1]
        code, out = world["runs"].run(*args, fault="extract:chunk:2", keep_worker_fds=keep_fds)
        assert code == FAULT_EXIT, out
        code, out = world["runs"].run("-v", *args)
        # the second chunk boundary may finish two chunks at once (lanes can complete together)
        assert code == 0 and re.search(r"resuming f\.h5\.partial\.h5: [23] of 3 chunks already done", out), out
        assert "unreadable" not in out
        # with a decode worker the batches are planned for parallel lanes: the same features to rounding
        assert_same_cache(case / "f.h5", world["ref"] / "f.h5", exact=False)


def test_a_partial_cache_held_open_elsewhere_is_waited_for(world):
    case = world["root"] / "held"
    args = ["extract-features", world["data"], "--out", case / "f.h5", *EXTRACT]
    assert world["runs"].run(*args, fault="extract:chunk:1")[0] == FAULT_EXIT
    with h5py.File(case / "f.h5.partial.h5", "r+"):  # HDF5's lock, as a writer in another process holds it
        p = world["runs"].start("-v", *args)
        deadline = time.monotonic() + 60
        while "open in another process" not in p.log.read_text() and p.exitcode is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    p.join(120)
    out = p.log.read_text()
    assert p.exitcode == 0 and "open in another process" in out and "1 of 3 chunks already done" in out, out
    assert_same_cache(case / "f.h5", world["ref"] / "f.h5")


def test_a_partial_cache_that_stays_held_is_one_line_and_kept(tmp_path, monkeypatch):
    from captions.errors import CaptionsError
    from captions.features import writer

    path = tmp_path / "f.h5.partial.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "x"
    monkeypatch.setattr(writer, "LOCK_WAIT_S", 0.3)
    code = ("import h5py, sys, time; f = h5py.File(sys.argv[1], 'r+'); print('open', flush=True); "
            "time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        with pytest.raises(CaptionsError, match=r"partial\.h5: is open in another process .* finished chunks are kept"):
            writer.open_shard(path, {}, ["a"])
    finally:
        holder.kill()
        holder.wait()
    assert path.exists()


# ------------------------------------------------------------------------ full and read-only disks
@pytest.fixture
def small_disk(tmp_path):
    """mount(size, ro=False) -> a folder on a tmpfs of ``size`` bytes, or None where this user
    cannot mount one; ``grow(folder)`` gives it room. Unmounted at the end."""
    mounted = []

    def mount(size: int, ro: bool = False) -> Path | None:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)],
                                               capture_output=True).returncode != 0:
            return None
        mounted.append(folder)
        return folder

    def grow(folder: Path) -> None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(folder)], check=True)

    mount.grow = grow
    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def one_error_line(out: str, *words: str) -> None:
    lines = [x for x in out.splitlines() if x.startswith("Error: ")]
    assert len(lines) == 1 and all(w in lines[0] for w in words) and "Traceback" not in out, out


@pytest.mark.parametrize("stage", ["extract", "train", "evaluate"])
def test_a_full_disk_is_one_line_keeps_the_finished_work_and_resumes(world, small_disk, stage):
    """The disk fills during the run: one line naming the file and 'No space left', nothing final
    written (never a cache marked complete with rows of zeros), then, given room, the resumed run
    equals the uninterrupted one. A tmpfs of a size the run outgrows, else an injected ENOSPC."""
    ckpt = (world["ref"] / "run" / "last.pt").stat().st_size
    size = {"extract": 64 * 1024, "train": 2 * ckpt + 8192, "evaluate": 4096}[stage]
    disk = small_disk(size)
    case = disk if disk is not None else world["root"] / f"enospc-{stage}"
    inject = None if disk is not None else {"extract": "extract:data:2:enospc", "train": "checkpoint:written:3:enospc",
                                            "evaluate": "evaluate:written:2:enospc"}[stage]
    args = stage_args(world, stage, case)
    code, out = world["runs"].run(*args, fault=inject)
    assert code == 1, out
    one_error_line(out, str(case), "No space left on device")
    if stage == "extract":
        assert not (case / "f.h5").exists()
        with h5py.File(case / "f.h5.partial.h5", "r") as f:
            assert not f.attrs["complete"]
            done = int(f["chunks_done"][:].sum())
        assert done < 3
    elif stage == "evaluate":
        assert not (case / "eval" / "metrics.json").exists() and not (case / "eval" / "predictions.json").exists()
    if disk is not None:
        small_disk.grow(disk)
    code, out = world["runs"].run("-v", *resume_args(stage, args))
    assert code == 0, out
    if stage == "extract":  # the chunks finished before the disk filled are kept
        assert f"resuming f.h5.partial.h5: {done} of 3 chunks already done" in out, out
    check_resumed(world, stage, case)


@pytest.mark.parametrize("stage", ["extract", "train", "evaluate"])
def test_a_read_only_output_is_one_line(world, small_disk, stage):
    disk = small_disk(1 << 20, ro=True)
    if disk is None:
        if os.geteuid() == 0:
            pytest.skip("root ignores folder permissions and cannot mount a read-only tmpfs here")
        disk = world["root"] / f"ro-{stage}"
        disk.mkdir()
        disk.chmod(0o555)
    code, out = world["runs"].run(*stage_args(world, stage, disk))
    assert code == 1
    one_error_line(out, str(disk), "Read-only file system" if os.geteuid() == 0 else "Permission denied")
    assert not any(disk.iterdir())


# ---------------------------------------------------------------------------------- two writers
@pytest.mark.parametrize("stage", ["extract", "train"])
def test_a_second_writer_is_refused_in_one_line_naming_the_lock_and_holder(world, stage):
    case = world["root"] / f"two-{stage}"
    args = stage_args(world, stage, case)
    case.mkdir()
    lock = case / (".f.h5.lock" if stage == "extract" else "run/.train.lock")
    lock.parent.mkdir(exist_ok=True)
    with output_lock(lock, "extract-features" if stage == "extract" else "train"):  # as a run in this process
        code, out = world["runs"].run(*args)
    assert code == 1, out
    one_error_line(out, f"(pid {os.getpid()} on ", f"holds {lock}")
    # two runs started together: the second is refused (or, when the first was done, finds nothing to do)
    first = world["runs"].start(*args)
    while first.exitcode is None and not lock.with_name(lock.name + ".pid").exists():
        time.sleep(0.01)
    code, out = world["runs"].run(*args)
    first.join(120)
    assert first.exitcode == 0, first.log.read_text()
    if code == 1:
        one_error_line(out, f"(pid {first.pid} on ", f"holds {lock}")
    else:
        assert code == 0 and ("already complete" in out or "stopped early" in out or "trained" in out), out
    check_resumed(world, stage, case)


def test_a_checkpoint_cut_short_by_a_full_disk_is_one_error_naming_it(small_disk):
    """Wherever the disk fills inside a checkpoint (torch's own zip writer would turn the OSError
    into a RuntimeError), save_checkpoint raises one OutputError naming the file and leaves nothing."""
    import torch

    from captions.errors import OutputError
    from captions.models.checkpoint import save_checkpoint

    for size in (64 * 1024, 300 * 1024, 700 * 1024):
        disk = small_disk(size)
        if disk is None:
            pytest.skip("cannot mount a tmpfs here (not root)")
        with pytest.raises(OutputError, match=r"last\.pt: No space left on device"):
            save_checkpoint(disk / "last.pt", {"weights": torch.zeros(300_000)})
        assert list(disk.iterdir()) == []

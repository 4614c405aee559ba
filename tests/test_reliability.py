"""Nothing lost: kills during checkpoint writes, preemption followed by a kill, resume from the newest
intact checkpoint, and outputs that a later run reads."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from moa.files import is_partial
from moa.training.checkpoints import resolve_ckpt_path
from moa.training.run import train


def _fake_checkpoint(path, step, mtime):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.zeros(3)}}, path)
    os.utime(path, (mtime, mtime))


def test_resume_picks_the_highest_intact_step_whatever_the_file_is_called(tmp_path, caplog):
    assert resolve_ckpt_path("last", tmp_path) is None  # a fresh job starts cleanly
    ckpts = tmp_path / "checkpoints"
    _fake_checkpoint(ckpts / "last.ckpt", 21, mtime=50)  # written by the preemption callback
    _fake_checkpoint(ckpts / "last-v1.ckpt", 100, mtime=40)  # ModelCheckpoint's, older mtime (copied back)
    _fake_checkpoint(ckpts / "step_0000050.ckpt", 50, mtime=60)
    _fake_checkpoint(tmp_path / "hpc_ckpt_1.ckpt", 60, mtime=70)
    assert resolve_ckpt_path("last", tmp_path) == str(ckpts / "last-v1.ckpt")
    # The newest step is truncated (a kill mid-write): the next intact one is taken, with a warning.
    data = (ckpts / "last-v1.ckpt").read_bytes()
    (ckpts / "last-v1.ckpt").write_bytes(data[: len(data) // 2])
    (ckpts / ".step_0000200.partial-123.ckpt").write_bytes(b"half a checkpoint")
    assert resolve_ckpt_path("last", tmp_path) == str(tmp_path / "hpc_ckpt_1.ckpt")
    assert "last-v1.ckpt is unreadable" in caplog.text
    assert not (ckpts / ".step_0000200.partial-123.ckpt").exists(), "the kill's leftover must be cleared"
    # Equal steps: the most recently written wins.
    _fake_checkpoint(ckpts / "step_0000060.ckpt", 60, mtime=80)
    assert resolve_ckpt_path("last", tmp_path) == str(ckpts / "step_0000060.ckpt")


WRITER = textwrap.dedent("""
    import sys, torch
    from moa.training.checkpoints import AtomicCheckpointIO
    io, path = AtomicCheckpointIO(), sys.argv[1]
    big = torch.randn(24_000_000)  # ~100 MB, so a kill lands mid-write
    step = 0
    while True:
        step += 1
        io.save_checkpoint({"global_step": step, "state_dict": {"w": big}}, path)
        print(step, flush=True)
""")


def test_a_kill_during_checkpoint_writes_never_leaves_a_truncated_checkpoint(tmp_path):
    elsewhere = tmp_path / "tmpdir"  # $TMPDIR away from the run: Lightning's own writer stages files there
    elsewhere.mkdir()
    run = tmp_path / "run"
    path = run / "checkpoints" / "last.ckpt"
    env = {**os.environ, "TMPDIR": str(elsewhere)}
    killed_mid_write = 0
    for attempt in range(3):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(attempt + 1):
            writer.stdout.readline()  # at least one complete write
        time.sleep(0.05 + 0.1 * attempt)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        killed_mid_write += any(is_partial(p) for p in path.parent.iterdir())
        chosen = resolve_ckpt_path("last", run)
        assert chosen == str(path)
        assert torch.load(chosen, weights_only=True, mmap=True)["global_step"] >= 1
        assert not [p for p in path.parent.iterdir() if is_partial(p)], "leftover temp file after resume"
        assert not list(elsewhere.iterdir()), "a checkpoint write left a file in $TMPDIR"
    assert killed_mid_write, "no kill landed during a write: the test did not test anything"


def test_preemption_then_a_kill_loses_no_step_and_exports_nothing_unfinished(compose_cfg, tmp_path):
    run = tmp_path / "run"
    common = ("callbacks.samples.every_n_steps=1000", "callbacks.model_checkpoint.every_n_train_steps=5",
              f"export_dir={run}/export", "trainer.max_steps=12")
    preempt = ("+callbacks.kill._target_=tests.helpers.SendSignalAtStep", "+callbacks.kill.step=3")
    _, first = train(compose_cfg(*common, *preempt, out=run))
    preempted_at = first["trainer"].global_step
    assert preempted_at in (3, 4)
    assert not (run / "export").exists(), "a preempted job exported unfinished weights"
    # ModelCheckpoint's first save (step 5) comes after the preemption's last.ckpt: the case where it
    # used to write last-v1.ckpt, and resume then went back to step 3.
    crash = ("+callbacks.crash._target_=tests.helpers.CrashAtStep", "+callbacks.crash.step=7")
    try:
        train(compose_cfg(*common, *crash, out=run))
    except RuntimeError as error:
        assert "simulated kill" in str(error)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert not [n for n in names if n.startswith("last-v")], f"ModelCheckpoint wrote beside last.ckpt: {names}"
    chosen = resolve_ckpt_path("last", run)
    assert torch.load(chosen, weights_only=True)["global_step"] == 5, f"resumed from {chosen}, not step 5"
    _, final = train(compose_cfg(*common, out=run))
    assert final["trainer"].global_step == 12
    assert (run / "export" / "moa.safetensors").exists()


def _corrupt_copy(source, destination, positions):
    import shutil

    from moa.data.stores import FolderStore
    from tests.test_data import _corrupt

    shutil.copytree(source, destination)
    ids = FolderStore(destination).split("all")
    for position in positions:
        _corrupt(destination, ids[position], "bbox_inverted")
    return ids


def test_skips_are_summed_over_two_loader_workers_and_logged(compose_cfg, synthetic_root, tmp_path):
    import csv

    ids = _corrupt_copy(synthetic_root, tmp_path / "ffhq", positions=(1, 7, 13))
    per_epoch = len(ids) // 2  # batch size 2: one epoch of the stream, so every corrupt sample is drawn once
    cfg = compose_cfg(f"data.root={tmp_path / 'ffhq'}", "++data.split=all", "data.num_workers=2", "data.max_corrupt_fraction=0.5",
                      f"trainer.max_steps={per_epoch}", "callbacks=none", "export_dir=null", out=tmp_path / "run")
    _, objects = train(cfg)
    assert (objects["datamodule"].samples_skipped, objects["datamodule"].samples_tried) == (3, len(ids) + 3)
    rows = list(csv.DictReader(open(next((tmp_path / "run").rglob("metrics.csv")))))
    logged = [r for r in rows if r.get("data/samples_skipped")]
    assert float(logged[-1]["data/samples_skipped"]) == 3  # logged whenever a skip happens


def test_the_corrupt_threshold_applies_to_the_totals(compose_cfg, synthetic_root, tmp_path):
    import pytest

    from moa.data.ffhq import CorruptDataError

    ids = _corrupt_copy(synthetic_root, tmp_path / "ffhq", positions=range(0, 22, 3))
    cfg = compose_cfg(f"data.root={tmp_path / 'ffhq'}", "++data.split=all", "data.num_workers=2",
                      "data.max_corrupt_fraction=0.1",
                      f"trainer.max_steps={len(ids)}", "callbacks=none", "export_dir=null", out=tmp_path / "run")
    with pytest.raises(CorruptDataError, match=r"(all workers and ranks).*max_corrupt_fraction=0.1"):
        train(cfg)

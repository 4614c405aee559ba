"""Sweeps, DDP, preemption and the Docker image, without a cluster (see tests/slurm for SLURM)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moa.training.run import train

ROOT = Path(__file__).resolve().parents[1]


def _run_train(tmp_path, *overrides, multirun=False, timeout=300):
    cmd = [sys.executable, str(ROOT / "train.py"), *(["--multirun"] if multirun else []),
           f"paths.cache_dir={tmp_path}/cache", "logger=csv", "data.num_workers=0", "~callbacks.samples", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_local_multirun_sweep_writes_one_run_per_value(tmp_path):
    _run_train(tmp_path, "model.lambda_router=1e-4,1e-2", "trainer.max_steps=2", f"hydra.sweep.dir={tmp_path}/sweep",
               multirun=True)
    runs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert [r.name for r in runs] == ["0", "1"]
    for run, value in zip(runs, (1e-4, 1e-2)):
        checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["global_step"] == 2
        assert checkpoint["hyper_parameters"]["lambda_router"] == pytest.approx(value)


def test_ddp_two_cpu_processes_with_a_batch_without_subjects(tmp_path):
    dump = tmp_path / "dump"
    # condition_dropout=1 drops every subject: the prompt encoder then gets zero gradients, and DDP
    # must neither hang nor complain about unused parameters.
    _run_train(tmp_path, "trainer.devices=2", "+trainer.strategy=ddp", "trainer.max_steps=3",
               "model.condition_dropout=1.0", f"hydra.run.dir={tmp_path}/run",
               "+callbacks.dump._target_=tests.helpers.DumpTrainableWeights", f"+callbacks.dump.out_dir={dump}")
    rank0, rank1 = load_file(dump / "rank0.safetensors"), load_file(dump / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert (tmp_path / "run" / "moa_weights" / "moa.safetensors").exists()


# The submitit-like variant (~30 s) runs with -m slow: the default suite is at its 10-minute budget.
@pytest.mark.parametrize("previous_handler", ["none", pytest.param("submitit-like exit", marks=pytest.mark.slow)])
def test_preemption_signal_checkpoints_and_resume_matches_uninterrupted(compose_cfg, tmp_path, previous_handler):
    common = ("callbacks.samples.every_n_steps=1000", "callbacks.model_checkpoint.every_n_train_steps=1000",
              "export_dir=null")
    _, straight = train(compose_cfg("trainer.max_steps=6", *common, out=tmp_path / "straight"))
    kill = ("+callbacks.kill._target_=tests.helpers.SendSignalAtStep", "+callbacks.kill.step=3")
    if previous_handler == "none":
        _, interrupted = train(compose_cfg("trainer.max_steps=6", *common, *kill, out=tmp_path / "preempted"))
        assert interrupted["trainer"].global_step in (3, 4), "the signal must stop training at the next step boundary"
    else:
        with pytest.raises(SystemExit):
            train(compose_cfg("trainer.max_steps=6", *common, *kill, "+callbacks.exit._target_=tests.helpers.ExitOnSignal",
                              out=tmp_path / "preempted"))
    assert torch.load(tmp_path / "preempted" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] in (3, 4)
    _, resumed = train(compose_cfg("trainer.max_steps=6", *common, out=tmp_path / "preempted"))
    a = straight["module"].model.trainable_state_dict()
    b = resumed["module"].model.trainable_state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

"""Against a real SLURM: a Hydra sweep through the submitit launcher, and a preempted job that is
requeued and resumes to exactly the weights of an uninterrupted run."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slurm


def _train_cmd(tmp_path, *overrides, multirun=True):
    return [sys.executable, str(ROOT / "train.py"), *(["--multirun", "hydra/launcher=slurm_cpu"] if multirun else []),
            "trainer=cpu", f"paths.cache_dir={tmp_path}/cache", "logger=csv", "data.num_workers=0",
            "~callbacks.samples", *overrides]


def _sacct_jobs():
    out = subprocess.run(["sacct", "-n", "-X", "-o", "JobID,State"], capture_output=True, text=True, check=True).stdout
    return [line.split() for line in out.splitlines() if line.strip()]


def test_multirun_sweep_runs_as_slurm_jobs(slurm_cluster, tmp_path):
    before = len(_sacct_jobs())
    result = subprocess.run(_train_cmd(tmp_path, "trainer.max_steps=2", "model.lambda_router=1e-4,1e-2",
                                       f"hydra.sweep.dir={tmp_path}/sweep"),
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        checkpoint = torch.load(tmp_path / "sweep" / job / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["global_step"] == 2
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*/*_submission.sh"))) == 1  # one sbatch array
    for _ in range(20):  # accounting lags the scheduler by a moment
        jobs = _sacct_jobs()[before:]
        if len(jobs) >= 2 and all(state == "COMPLETED" for _, state in jobs):
            break
        time.sleep(1)
    assert len(jobs) == 2 and all(state == "COMPLETED" for _, state in jobs), jobs


@pytest.mark.slow  # ~75 s on 2 cores; the default suite keeps the in-process preemption tests (test_scaleout.py)
def test_preempted_job_is_requeued_and_resumes_to_the_uninterrupted_weights(slurm_cluster, tmp_path):
    steps = ("trainer.max_steps=60", "callbacks.model_checkpoint.every_n_train_steps=5")
    start = time.monotonic()
    sweep = tmp_path / "sweep"
    hydra = subprocess.Popen(_train_cmd(tmp_path, *steps, f"hydra.sweep.dir={sweep}"), cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            if (sweep / "0" / "checkpoints" / "step_0000005.ckpt").exists() or hydra.poll() is not None:
                break
            time.sleep(0.2)
        job_id = next(p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit())
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        output, _ = hydra.communicate(timeout=600)
    finally:
        hydra.kill()
    assert hydra.returncode == 0, output[-3000:]
    log = "".join(p.read_text() for p in (sweep / ".submitit" / job_id).glob("*_log.*"))
    saved = re.search(r"saved .*last\.ckpt at step (\d+)", log)
    assert saved, "the preemption checkpoint was not written"
    assert "this job is preempted" in log and f"resuming from {sweep}/0/checkpoints/last.ckpt" in log
    resume_step = int(saved.group(1))
    assert 5 <= resume_step < 60
    print(f"preempted at step {resume_step}; preempt + requeue + finish took {time.monotonic() - start:.1f}s")

    straight = subprocess.run(_train_cmd(tmp_path, *steps, f"hydra.run.dir={tmp_path}/straight", multirun=False),
                              capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    resumed = load_file(sweep / "0" / "moa_weights" / "moa.safetensors")
    uninterrupted = load_file(tmp_path / "straight" / "moa_weights" / "moa.safetensors")
    assert max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed) <= 1e-6
    run_ids = {p.name.rsplit("-", 1)[-1] for p in (sweep / "0" / "wandb").glob("offline-run-*")} \
        if (sweep / "0" / "wandb").exists() else set()
    assert len(run_ids) <= 1

"""Training callbacks: sample images and router maps, saved as PNGs and logged to wandb."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from moa.files import save_image
from moa.inference.pipeline import MoAPipeline
from moa.inference.visualize import image_grid, router_map_figure

log = logging.getLogger(__name__)


def _denormalize(pixels: torch.Tensor, mean, std) -> Image.Image:
    image = pixels * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return Image.fromarray((image.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())


class SampleImagesCallback(pl.Callback):
    """Every ``every_n_steps`` (and at the end): for the first ``num_samples`` held-out samples (the
    validation split; the training split when there is none), generate prior-only and personalized
    images from the same seed, side by side with the subject, then a subject-swap row (the first
    prompt with the second sample's subjects), plus the router maps of the first one. Drawn with the
    EMA weights when the module keeps them. Only rank 0 generates."""

    def __init__(self, *, every_n_steps: int, out_dir: str, num_samples: int = 2, num_inference_steps: int = 25,
                 guidance_scale: float = 7.5, seed: int = 0):
        self.every_n_steps, self.out_dir, self.num_samples = every_n_steps, Path(out_dir), num_samples
        self.num_inference_steps, self.guidance_scale, self.seed = num_inference_steps, guidance_scale, seed
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.render(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.render(trainer, pl_module)

    @rank_zero_only
    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "val_dataset", None) or datamodule.dataset
        with pl_module.averaged_weights():
            rows, labels, router = self._draw(pl_module, dataset, step)
        grid = image_grid(rows, labels)
        save_image(grid, self.out_dir / f"samples_step{step:07d}.png")
        if router is not None:
            save_image(router, self.out_dir / f"router_maps_step{step:07d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples/prior_vs_moa", [grid], step=step,
                                 caption=["columns: prior-only | MoA | subject(s); last row: subject swap"])
                if router is not None:
                    logger.log_image("samples/router_maps", [router], step=step)
        log.info("wrote samples and router maps for step %d to %s", step, self.out_dir)

    def _draw(self, pl_module, dataset, step: int) -> tuple[list, list[str], Image.Image | None]:
        pipe = MoAPipeline.from_moa_model(pl_module.model)
        pipe.set_progress_bar_config(disable=True)
        spec = pl_module.model.subject_image_spec
        keys = ("subject_pixel_values", "subject_token_index", "subject_valid")
        samples = [dataset[index] for index in range(min(self.num_samples, len(dataset)))]
        requests = [(dataset.caption(int(s["index"])), s, {k: s[k][None] for k in keys}) for s in samples]
        if len(samples) >= 2:  # the first prompt and token positions, the second sample's subjects
            first, second = samples[0], samples[1]
            swapped = {"subject_pixel_values": second["subject_pixel_values"][None],
                       "subject_token_index": first["subject_token_index"][None],
                       "subject_valid": (first["subject_valid"] & second["subject_valid"])[None]}
            requests.append((requests[0][0], second, swapped))
        rows, labels, router = [], [], None
        for row, (caption, shown, prepared) in enumerate(requests):
            is_swap = row == len(samples)
            outputs = {}
            for mode, subjects in (("prior", None), ("moa", prepared)):
                # The swap row repeats the first row's prompt and seed: only the subject differs.
                generator = torch.Generator(device=pl_module.device).manual_seed(self.seed + (0 if is_swap else row))
                outputs[mode] = pipe(caption, prepared_subjects=subjects, num_inference_steps=self.num_inference_steps,
                                     guidance_scale=self.guidance_scale, generator=[generator],
                                     record_router_maps=mode == "moa" and row == 0)
            references = [_denormalize(p, spec.mean, spec.std) for p, v in
                          zip(shown["subject_pixel_values"], prepared["subject_valid"][0]) if v]
            rows.append([outputs["prior"].images[0], outputs["moa"].images[0], *references])
            labels.append(f"swap: {caption}" if is_swap else caption)
            if row == 0 and outputs["moa"].router_maps:  # the no_moa ablation has no router
                latent = (pipe.unet.config.sample_size, pipe.unet.config.sample_size)
                router = router_map_figure(outputs["moa"].images[0], outputs["moa"].router_maps, latent_size=latent,
                                           title=f"training step {step}: {caption}")
        return rows, labels, router


class PreemptionCheckpoint(pl.Callback):
    """Save ``last.ckpt`` when the cluster announces preemption or time-out, then let the job go.

    SLURM sends ``signal`` (submitit's USR2) some time before it stops a job. A signal handler must not
    write a checkpoint itself (it could land in the middle of an optimizer step), so it only raises a
    flag; the next batch end agrees on it across ranks, saves a consistent checkpoint, and then hands
    over to the handler that was installed before (submitit's: requeue the job and exit). Without such
    a handler, training stops cleanly, and ``train`` does not export the unfinished weights. The requeued
    job resumes through ``ckpt_path=last`` (the checkpoint with the highest step, whatever its name).

    Args:
        signal_name: the signal to watch (``SIGUSR2`` for submitit; Lightning handles its own SIGUSR1).
        check_every_n_steps: how often ranks compare flags in DDP (a collective, so not every step).
    """

    def __init__(self, *, dirpath: str, signal_name: str = "SIGUSR2", check_every_n_steps: int = 10):
        self.path = Path(dirpath) / "last.ckpt"
        self.signum = getattr(signal, signal_name)
        self.check_every_n_steps = check_every_n_steps
        self._received = False
        self._frame = None
        self._previous = None
        self.preempted = False  # set once the checkpoint is saved: the run stopped before its end

    def _handler(self, signum, frame) -> None:
        log.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)
        self._received = True
        self._frame = frame

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(self.signum)
            signal.signal(self.signum, self._handler)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size > 1:
            if trainer.global_step % self.check_every_n_steps:
                return
            stop = trainer.strategy.reduce_boolean_decision(self._received, all=False)
        else:
            stop = self._received
        if not stop:
            return
        trainer.save_checkpoint(self.path)
        self.preempted = True
        log.warning("saved %s at step %d for the requeued job", self.path, trainer.global_step)
        previous, self._previous = self._previous, None
        signal.signal(self.signum, previous if previous is not None else signal.SIG_DFL)
        if callable(previous):
            previous(self.signum, self._frame)
        trainer.should_stop = True

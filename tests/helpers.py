"""Callbacks that tests add through Hydra (`+callbacks.x._target_=tests.helpers...`) to look inside runs,
and the module + first batch most unit tests of the training step start from."""

from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from safetensors.torch import save_file


def module_and_batch(compose_cfg, *overrides):
    """(MoALitModule, a batch of the first 2 training samples, the set-up DataModule) for ``overrides``."""
    cfg = compose_cfg(*overrides)
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup()
    batch = next(iter(torch.utils.data.DataLoader(datamodule.dataset, batch_size=2)))
    return module, batch, datamodule


class DumpTrainableWeights(pl.Callback):
    """Every rank writes its trainable weights at the end of training: rank<r>.safetensors."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in pl_module.model.trainable_state_dict().items()}
        save_file(state, self.out_dir / f"rank{trainer.global_rank}.safetensors")


class SendSignalAtStep(pl.Callback):
    """Sends ``signal_name`` to this process after global step ``step``, as a cluster would."""

    def __init__(self, step: int, signal_name: str = "SIGUSR2"):
        self.step, self.signal_name = step, signal_name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), getattr(signal, self.signal_name))


class ExitOnSignal(pl.Callback):
    """Installs, before training starts, a handler that exits like submitit's requeue handler does."""

    def __init__(self, signal_name: str = "SIGUSR2"):
        self.signal_name = signal_name

    def setup(self, trainer, pl_module, stage):
        import signal

        def exit_like_submitit(signum, frame):
            raise SystemExit(-1)

        signal.signal(getattr(signal, self.signal_name), exit_like_submitit)


class CrashAtStep(pl.Callback):
    """Raises after global step ``step``: the job dies there, as if killed, without any checkpoint hook."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated kill at step {self.step}")

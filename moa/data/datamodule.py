"""Lightning DataModule for FFHQ-wild, with a sampler that resumes at the exact sample."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler, Subset
from transformers import CLIPTokenizer

from moa.data.ffhq import CorruptDataError, FFHQWildDataset, SubjectSource
from moa.data.latents import check_latent_cache
from moa.data.stores import open_store
from moa.data.subjects import real_subject_slots
from moa.data.transforms import SubjectAugmentation, SubjectImageSpec
from moa.pretrained import check_pretrained_path, tokenizer_source
from moa.seeding import derived_seed

log = logging.getLogger(__name__)


class ResumableStreamSampler(Sampler):
    """An endless stream of dataset indices: epoch ``e`` is a permutation seeded by ``(seed, e)``,
    split across DDP ranks. ``start`` skips that many of this rank's samples without drawing them,
    so a resumed run sees exactly the samples an uninterrupted run would have seen next.
    ``with_draw``: yield (index, draw number) instead, the draw number unique across ranks and
    positions, to seed each sample's augmentation.

    Training is counted in steps (the paper trains 40k iterations), so an endless stream fits, and it
    lets the position be derived from the restored global step alone: no state has to be guessed
    around Lightning's batch prefetching.
    """

    def __init__(self, num_samples: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0,
                 with_draw: bool = False):
        self.num_samples, self.seed, self.rank, self.world_size, self.start = num_samples, seed, rank, world_size, start
        self.with_draw = with_draw
        self.per_rank = num_samples // world_size
        if self.per_rank == 0:
            raise ValueError(f"{num_samples} samples cannot be split across {world_size} ranks")

    def _epoch(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
        order = torch.randperm(self.num_samples, generator=generator)[: self.per_rank * self.world_size]
        return order[self.rank:: self.world_size].tolist()

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_rank)
        position = self.start
        while True:
            for index in self._epoch(epoch)[offset:]:
                yield (index, position * self.world_size + self.rank) if self.with_draw else index
                position += 1
            epoch, offset = epoch + 1, 0


class FFHQWildDataModule(pl.LightningDataModule):
    """FFHQ-wild training data; the tokenizer and clip settings come from the model's folders.

    Args:
        root: FFHQ-wild folder.
        base_model: the Stable Diffusion folder whose ``tokenizer/`` tokenizes captions (for a single-file
            checkpoint, ``base_model_config``'s tokenizer).
        image_encoder: the CLIP vision folder whose ``preprocessor_config.json`` sets subject crops.
        resolution: training image size in pixels (SD1.5: 512).
        batch_size: per device.
        num_workers: loader worker processes.
        seed: data order seed.
        data_format: ``"folder"`` (FFHQ-wild as files) or ``"shards"`` (tar shards from ``moa.data.shards``).
        subject_source: where each subject's image comes from: None for the subject cut from the target
            image (FastComposer's way), or a callable (see ``moa.data.ffhq.SubjectSource``), e.g.
            SynthWorld's ``ReferenceRenders``.
        augmentation: the subject-image augmentation of the training split (``SubjectAugmentation``), or None.
        target_flip_p: probability of flipping a training image together with its masks and boxes.
        cached_latents: train from the VAE latents cached by ``moa.data.latents`` instead of encoding the
            images in every step (then ``target_flip_p`` must be 0).
        face_regions: also read each person's ``face_bbox`` into ``subject_face_masks`` (for
            ``model.face_loss_weight``); the first ``FACE_BOX_PROBE`` samples must have one somewhere.
        val_split: the split of held-out subjects for the validation loss and samples (None: no validation).
        val_samples: how many of them (the first ones, always the same).
        max_corrupt_fraction: stop the run once more than this share of the samples tried (summed over
            loader workers and ranks, at least ``MIN_TRIED_FOR_THRESHOLD`` of them) had to be skipped.

    Skip totals are logged as ``data/samples_skipped``, ``data/samples_tried`` and
    ``data/skipped_fraction`` and kept in the checkpoint, so a resumed run continues them.
    """

    MIN_TRIED_FOR_THRESHOLD = 20
    FACE_BOX_PROBE = 32

    def __init__(self, *, root: str, base_model: str, image_encoder: str, resolution: int = 512, batch_size: int = 32,
                 num_workers: int = 2, seed: int = 0, split: str = "train", data_format: str = "folder",
                 max_subjects: int = 4, max_corrupt_fraction: float = 0.05, base_model_config: str | None = None,
                 subject_source: SubjectSource | None = None, augmentation: SubjectAugmentation | None = None,
                 target_flip_p: float = 0.0, cached_latents: bool = False, face_regions: bool = False,
                 val_split: str | None = "test", val_samples: int = 16):
        super().__init__()
        if not Path(root).is_dir():
            raise FileNotFoundError(f"data.root={root!r}: no such folder (expected FastComposer's FFHQ-wild layout)")
        self.data_format, self.subject_source = data_format, subject_source
        check_pretrained_path(base_model, option="base_model", expect="a diffusers Stable Diffusion folder or a "
                                                                      "single-file checkpoint")
        self.root, self.image_encoder = root, image_encoder
        self.tokenizer_source = tokenizer_source(base_model, base_model_config)
        self.resolution, self.batch_size, self.num_workers, self.seed = resolution, batch_size, num_workers, seed
        self.split, self.max_subjects, self.max_corrupt_fraction = split, max_subjects, max_corrupt_fraction
        self.augmentation, self.target_flip_p = augmentation, target_flip_p
        self.cached_latents, self.face_regions = cached_latents, face_regions
        if cached_latents:
            if target_flip_p > 0:
                raise ValueError(f"data.target_flip_p={target_flip_p} with data.cached_latents=true: a cached latent "
                                 "cannot be flipped; set data.target_flip_p=0 or data.cached_latents=false")
            check_latent_cache(open_store(root, data_format), resolution=resolution, base_model=base_model)
        self.val_split, self.val_samples = val_split, val_samples
        self.dataset: FFHQWildDataset | None = None
        self.val_dataset: FFHQWildDataset | None = None
        self.samples_skipped = self.samples_tried = 0

    def _dataset(self, split: str, **kwargs) -> FFHQWildDataset:
        return FFHQWildDataset(
            self.root, split=split, data_format=self.data_format, resolution=self.resolution,
            max_subjects=self.max_subjects, subject_source=self.subject_source, seed=self.seed,
            cached_latents=self.cached_latents, face_regions=self.face_regions,
            tokenizer=CLIPTokenizer.from_pretrained(self.tokenizer_source, subfolder="tokenizer"),
            subject_image_spec=SubjectImageSpec.from_pretrained(self.image_encoder), **kwargs)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = self._dataset(self.split, augmentation=self.augmentation, target_flip_p=self.target_flip_p)
            if self.face_regions:
                self._check_face_boxes()
        if self.val_dataset is None and self.val_split and self.val_samples > 0:
            if self.val_split not in open_store(self.root, self.data_format).available_splits():
                log.warning("data.val_split=%s: %s has no such split, so no validation", self.val_split, self.root)
                self.val_split = None
            else:
                self.val_dataset = self._dataset(self.val_split)

    def _check_face_boxes(self) -> None:
        """Fail before training when ``face_regions`` is asked of data that has no face boxes at all
        (the face-weighted loss would silently be the plain one)."""
        store, ids = self.dataset.store, self.dataset.ids[: self.FACE_BOX_PROBE]
        for image_id in ids:
            segments = json.loads(store.read(image_id, "json")).get("segments") or []
            if any(isinstance(s, dict) and s.get("face_bbox") is not None for s in segments):
                return
        raise ValueError(f"data.face_regions=true: none of the first {len(ids)} samples of {self.root} ({self.split} "
                         "split) has a person segment with a face_bbox ([x1, y1, x2, y2] pixels; see moa/data/ffhq.py)")

    def val_dataloader(self) -> DataLoader | list:
        """The first ``val_samples`` held-out samples, unaugmented, in a fixed order."""
        self.setup()
        if self.val_dataset is None:
            return []
        subset = Subset(self.val_dataset, range(min(self.val_samples, len(self.val_dataset))))
        return DataLoader(subset, batch_size=self.batch_size, shuffle=False, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank, world, start = 0, 1, 0
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
            # On resume the global step is already restored when Lightning asks for the loader.
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches * self.batch_size
        if start:
            log.info("resuming the data stream at sample %d of rank %d", start, rank)
        sampler = ResumableStreamSampler(len(self.dataset), seed=self.seed, rank=rank, world_size=world, start=start,
                                         with_draw=True)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0,
                          drop_last=True)

    def on_before_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict[str, torch.Tensor]:
        """Index the real subject slots while the batch is still on the host (``real_subject_slots``):
        the image encoder then skips the padding slots, most of them in batches of single subjects."""
        return {**batch, "real_subject_slots": real_subject_slots(batch["subject_valid"])}

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict[str, torch.Tensor]:
        """Add this batch's skips, summed over ranks, to the run's totals; log them; stop past the threshold."""
        skipped = batch.pop("skipped", None)
        if skipped is None or self.trainer is None or not self.trainer.training:  # validation: not counted
            return batch
        counts = torch.stack([skipped.sum(), torch.tensor(skipped.numel(), device=skipped.device)]).float()
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        new_skips = int(counts[0])
        self.samples_skipped += new_skips
        self.samples_tried += new_skips + int(counts[1])
        fraction = self.samples_skipped / self.samples_tried
        step = self.trainer.global_step
        if self.trainer.is_global_zero and (new_skips or step % self.trainer.log_every_n_steps == 0):
            for logger in self.trainer.loggers:
                logger.log_metrics({"data/samples_skipped": self.samples_skipped, "data/samples_tried":
                                    self.samples_tried, "data/skipped_fraction": fraction}, step=step)
        if self.samples_tried >= self.MIN_TRIED_FOR_THRESHOLD and fraction > self.max_corrupt_fraction:
            raise CorruptDataError(
                f"{self.samples_skipped} of {self.samples_tried} samples tried in {self.root} (all workers and "
                f"ranks) could not be used, above data.max_corrupt_fraction={self.max_corrupt_fraction}; the "
                f"reasons, with each sample's id, are in the log")
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"samples_skipped": self.samples_skipped, "samples_tried": self.samples_tried}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.samples_skipped, self.samples_tried = state_dict["samples_skipped"], state_dict["samples_tried"]

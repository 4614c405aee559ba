"""Where FFHQ-wild samples are read from: the folder of files, or tar shards written by ``moa.data.shards``.

Both stores answer the same two questions (which ids a split lists, the bytes of one member), so the
dataset reads either the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SPLIT_FILES = {"all": "image_ids.txt", "train": "image_ids_train.txt", "test": "image_ids_test.txt"}
SHARD_INDEX = "index.json"
CACHE_MANIFEST = "latent_cache.json"  # which resolution and VAE the cached latents belong to (moa.data.latents)


def latent_member(image_id: str, resolution: int) -> tuple[str, str]:
    """(name, extension) of a sample's cached latent distribution, as ``read`` takes them: a companion
    file ``<id>_latent<R>.npy`` beside the sample, so ``pack_shards`` carries it."""
    return f"{image_id}_latent{resolution}", "npy"


class FolderStore:
    """Samples as files: ``root/<id[:5]>/<id>.<ext>`` (FastComposer's layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={str(root)!r}: no such folder (expected FastComposer's FFHQ-wild layout)")

    def split(self, split: str) -> list[str]:
        if split not in SPLIT_FILES:
            raise ValueError(f"data.split={split!r}: expected one of {sorted(SPLIT_FILES)}")
        path = self.root / SPLIT_FILES[split]
        if not path.exists():
            raise FileNotFoundError(f"data.root={str(self.root)!r}: {path.name} not found (is this an FFHQ-wild folder?)")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    def read(self, image_id: str, extension: str) -> bytes:
        return (self.root / image_id[:5] / f"{image_id}.{extension}").read_bytes()

    def available_splits(self) -> list[str]:
        return [name for name, file in SPLIT_FILES.items() if (self.root / file).exists()]

    def read_root(self, name: str) -> bytes:
        """A file at the root (e.g. the latent cache's manifest)."""
        return (self.root / name).read_bytes()


class ShardStore:
    """Reads samples from shards written by ``pack_shards`` (one open file per shard and process)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not (self.root / SHARD_INDEX).exists():
            raise FileNotFoundError(f"data.root={str(root)!r}: no {SHARD_INDEX} (expected shards from moa.data.shards)")
        index = json.loads((self.root / SHARD_INDEX).read_text())
        self.splits, self.members = index["splits"], index["members"]
        self._files: dict[str, object] = {}
        self._pid = os.getpid()

    def split(self, split: str) -> list[str]:
        if split not in self.splits:
            raise ValueError(f"data.split={split!r}: the shards in {self.root} have {sorted(self.splits)}")
        return self.splits[split]

    def available_splits(self) -> list[str]:
        return list(self.splits)

    def read_root(self, name: str) -> bytes:
        """A file beside the shards (``pack_shards`` copies the root's files there)."""
        return (self.root / name).read_bytes()

    def read(self, image_id: str, extension: str) -> bytes:
        try:
            shard, offset, size = self.members[image_id][extension]
        except KeyError:
            raise FileNotFoundError(f"{image_id}.{extension} is not in the shards of {self.root}") from None
        if os.getpid() != self._pid:  # a forked loader worker must not share file offsets
            self._files, self._pid = {}, os.getpid()
        handle = self._files.get(shard)
        if handle is None:
            handle = self._files[shard] = open(self.root / shard, "rb")  # noqa: SIM115 (kept open for reuse)
        handle.seek(offset)
        return handle.read(size)


def open_store(root: str | Path, data_format: str):
    """``"folder"``: the FFHQ-wild folder; ``"shards"``: tar shards written by ``moa.data.shards``."""
    if data_format == "folder":
        return FolderStore(root)
    if data_format == "shards":
        return ShardStore(root)
    raise ValueError(f"data.format={data_format!r}: expected 'folder' or 'shards'")

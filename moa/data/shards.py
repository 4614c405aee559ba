"""FFHQ-wild packed into tar shards, for clusters whose file systems dislike 200k small files.

Each shard is a plain tar whose members are ``<id>.jpg``, ``<id>.json`` and ``<id>.npy`` (the naming
webdataset uses, so its tools read the shards too). ``index.json`` beside them lists the splits and
where each member's bytes start, so ``ShardStore`` reads any sample with one seek: the same
``FFHQWildDataset`` code, the same samples, in any order, resumable.

    python -m moa.data.shards --root data/ffhq_wild --out data/ffhq_wild_shards --samples-per-shard 2000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tarfile
from pathlib import Path

from tqdm import tqdm

from moa.data.stores import CACHE_MANIFEST, SHARD_INDEX, FolderStore
from moa.files import atomic_path, write_text

log = logging.getLogger(__name__)

EXTENSIONS = ("jpg", "json", "npy")


def pack_shards(root: str | os.PathLike, out: str | os.PathLike, *, samples_per_shard: int = 2000) -> Path:
    """Pack an FFHQ-wild folder into tar shards plus ``index.json``: each sample's jpg/json/npy and any
    companion file ``<id>_*``. Missing files are left out (the reader then reports the sample as
    corrupt, exactly as the folder reader would)."""
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard={samples_per_shard!r}: expected a positive number of samples")
    source, out = FolderStore(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {name: source.split(name) for name in source.available_splits()}
    ids = splits["all"]
    members: dict[str, dict[str, list]] = {}
    for first in tqdm(range(0, len(ids), samples_per_shard), desc="packing shards"):
        name = f"shard-{first // samples_per_shard:05d}.tar"
        with atomic_path(out / name) as tmp, tarfile.open(tmp, "w") as tar:
            for image_id in ids[first: first + samples_per_shard]:
                folder = source.root / image_id[:5]
                files = [folder / f"{image_id}.{extension}" for extension in EXTENSIONS]
                # Companion files named after the sample (e.g. SynthWorld's <id>_ref<k> renders) travel with it.
                files += sorted(folder.glob(f"{image_id}_*.*"))
                for path in files:
                    if path.exists():
                        tar.add(path, arcname=path.name)
        with tarfile.open(out / name) as tar:
            for member in tar.getmembers():
                image_id, extension = member.name.rsplit(".", 1)
                members.setdefault(image_id, {})[extension] = [name, member.offset_data, member.size]
    if (source.root / CACHE_MANIFEST).exists():  # cached latents travel as companion files; their manifest too
        write_text(out / CACHE_MANIFEST, (source.root / CACHE_MANIFEST).read_text())
    write_text(out / SHARD_INDEX, json.dumps({"splits": splits, "members": members}))
    log.info("packed %d samples into %s", len(ids), out)
    return out


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of samples")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="FFHQ-wild folder")
    parser.add_argument("--out", required=True, help="output folder for shard-*.tar and index.json")
    parser.add_argument("--samples-per-shard", type=positive_int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    pack_shards(args.root, args.out, samples_per_shard=args.samples_per_shard)


if __name__ == "__main__":
    main()

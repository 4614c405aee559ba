"""The paper's single-subject evaluation protocol (15 CelebA subjects x 40 prompts x 4 images)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class Protocol:
    """Subjects (id -> reference image, word) and prompt templates (with ``{c}`` for the word)."""

    root: Path
    class_token: dict[str, str]
    prompts: list[str]
    images_per_prompt: int
    raw: dict

    def reference_image(self, subject_id: str) -> Path:
        images = sorted((self.root / subject_id).glob("*.jpg"))
        if len(images) != 1:
            raise FileNotFoundError(f"{self.root / subject_id}: expected one reference .jpg, found {len(images)}")
        return images[0]


def load_protocol(root: str | Path | None = None) -> Protocol:
    """Read ``protocol.json`` from ``root`` (default: the copy shipped in ``moa/assets``)."""
    root = Path(root) if root else Path(str(resources.files("moa") / "assets" / "celeba_test_single"))
    path = root / "protocol.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: evaluation protocol not found")
    raw = json.loads(path.read_text())
    prompts = [p for group in raw["prompt_templates"].values() for p in group]
    return Protocol(root=root, class_token=raw["class_token"], prompts=prompts,
                    images_per_prompt=int(raw["images_per_prompt"]), raw=raw)

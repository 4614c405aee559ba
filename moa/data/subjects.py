"""Binding subjects to words of a prompt, and words to token positions."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch

MAX_SUBJECTS = 4  # FastComposer's limit, kept so numbers stay comparable


def real_subject_slots(subject_valid: torch.Tensor) -> torch.Tensor:
    """(batch, subjects) bool -> (n,) flat indices of the slots that hold a subject (the image encoder
    skips the padding ones). Computed on the host before the batch moves to the GPU: ``nonzero`` there
    would wait for the device."""
    return subject_valid.flatten().nonzero().squeeze(1)


class SubjectBindingError(ValueError):
    """A subject cannot be bound to a token of its prompt."""


def word_ends(prompt: str, words: Sequence[str]) -> list[int]:
    """Character index just past each subject's word in ``prompt``.

    The k-th subject bound to a word takes that word's k-th occurrence, so
    ``word_ends("a man and a man", ["man", "man"])`` binds one subject to each "man".
    Raises ``SubjectBindingError`` when a word does not occur often enough.
    """
    if len(words) > MAX_SUBJECTS:
        raise SubjectBindingError(f"at most {MAX_SUBJECTS} subjects per prompt, got {len(words)}")
    seen: Counter[str] = Counter()
    ends = []
    for index, word in enumerate(words):
        occurrences = [m.end() for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, flags=re.IGNORECASE)]
        if seen[word.lower()] >= len(occurrences):
            raise SubjectBindingError(
                f"subject {index} is bound to the word {word!r}, which occurs {len(occurrences)} time(s) in "
                f"the prompt {prompt!r} but {seen[word.lower()] + 1} subject(s) are bound to it"
            )
        ends.append(occurrences[seen[word.lower()]])
        seen[word.lower()] += 1
    return ends


def token_positions(offsets: Sequence[tuple[int, int]], ends: Sequence[int], prompt: str) -> list[int | None]:
    """Token position of each word, given the tokenizer's character offsets of the padded sequence.

    A word that spans several tokens is bound to its last token (the one that ends at ``end``).
    Returns ``None`` for a word cut off by the tokenizer's truncation; raises
    ``SubjectBindingError`` when ``end`` is not the end of any token (not a word boundary).
    """
    token_ends = {}
    for position, (start, end) in enumerate(offsets):
        if end > start:
            token_ends[end] = position
    kept_chars = max((end for start, end in offsets if end > start), default=0)
    positions: list[int | None] = []
    for end in ends:
        if not 0 < end <= len(prompt):
            raise SubjectBindingError(f"subject word end {end} is outside the caption {prompt!r} ({len(prompt)} chars)")
        if end in token_ends:
            positions.append(token_ends[end])
        elif end > kept_chars:
            positions.append(None)  # beyond the tokenizer's max_length: the caller decides
        else:
            raise SubjectBindingError(
                f"character {end} of {prompt!r} is not the end of a token (text before it: {prompt[:end]!r})"
            )
    if len({p for p in positions if p is not None}) < len([p for p in positions if p is not None]):
        raise SubjectBindingError(f"two subjects are bound to the same token in {prompt!r}")
    return positions

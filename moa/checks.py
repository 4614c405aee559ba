"""Configuration errors: one line naming the option, checked before anything heavy is imported or loaded.

Every failure is a ``ConfigError`` whose message is one line: the option, its value, what was expected.
The entry points (``train.py``, ``evaluate.py``) print that line and exit with status 2, without a trace.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from functools import wraps
from typing import NamedTuple

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value or path that cannot work (the message names the option and the fix)."""


class Range(NamedTuple):
    """What an option accepts: an integer (else any finite number) in [low, high]; ``above_low`` makes the
    lower bound strict; ``nullable`` accepts null (meaning: the default); ``multiple_of`` for sizes."""

    integer: bool
    low: float
    high: float | None
    expected: str
    above_low: bool = False
    nullable: bool = False
    multiple_of: int = 1

    def accepts(self, value) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        return (math.isfinite(value) and (value > self.low if self.above_low else value >= self.low)
                and (self.high is None or value <= self.high) and (not self.integer or value % self.multiple_of == 0))


def check_ranges(cfg: DictConfig, ranges: dict[str, Range]) -> None:
    """Raise ``ConfigError`` for the first option of ``ranges`` whose value it does not accept; options
    absent from ``cfg`` are skipped (each config group has its own options)."""
    for option, accepted in ranges.items():
        value = OmegaConf.select(cfg, option, default="<absent>", throw_on_missing=False)
        if value != "<absent>" and not accepted.accepts(value):
            raise ConfigError(f"{option}={value!r}: expected {accepted.expected}")


GUIDANCE_RANGES = {
    "guidance_scale": Range(False, 0, None, "a non-negative guidance scale (1: no guidance)"),
    "subject_guidance_scale": Range(False, 0, None, "a non-negative scale of the subject images' share, or null "
                                    "(plain guidance)", nullable=True),
}


def check_guidance(cfg: DictConfig) -> None:
    """The sampler's guidance options of a generating command (``MoAPipeline.__call__``)."""
    check_ranges(cfg, GUIDANCE_RANGES)
    if cfg.get("subject_guidance_scale") is not None and cfg.guidance_scale <= 1:
        raise ConfigError(f"subject_guidance_scale={cfg.subject_guidance_scale}: needs classifier-free guidance, "
                          f"guidance_scale > 1 (got {cfg.guidance_scale})")


def exit_on_config_error(main: Callable) -> Callable:
    """Wrap an entry point: a ``ConfigError`` is printed as its one line, and the process exits with 2."""

    @wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ConfigError as error:
            log.error("configuration error: %s", error)
            sys.exit(2)
    return wrapped

"""Compatibility re-export: the pipeline lives in ``moa.inference.pipeline``."""

from moa.inference.pipeline import MoAPipeline, MoAPipelineOutput, Subject

__all__ = ["MoAPipeline", "MoAPipelineOutput", "Subject"]

"""The teacher: prompts, engines (transformers, vLLM, OpenAI-compatible), parsing and the transform stage."""

from rebase.teacher.transform import TransformSummary, transform

__all__ = ["TransformSummary", "transform"]

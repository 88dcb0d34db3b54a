"""The teacher: prompts, parsing and validation gates, and the transform stage (engines live in rebase.generate)."""

from rebase.teacher.transform import TransformSummary, dry_run, transform

__all__ = ["TransformSummary", "dry_run", "transform"]

"""rebase: Retrieval Based Distillation (ReBase, Ge et al. 2024) as a Ray application."""

__version__ = "0.1.0"

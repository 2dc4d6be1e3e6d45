"""Deployment targets: one TOML file per target, loaded and validated by `schema`."""

from .schema import Quantizer, Target, builtin_names, load_target

__all__ = ["Quantizer", "Target", "builtin_names", "load_target"]

"""Thin recipes, one per stage: they wire the config to the library in ``pipeline/``."""

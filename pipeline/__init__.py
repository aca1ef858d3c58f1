"""Offline knowledge distillation: run the teacher once, cache its logits, train many students."""

__version__ = "0.1.0"

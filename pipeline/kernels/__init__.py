"""Numba distance kernels: NumPy in, NumPy out, forward and gradient fused in one pass
per row, parallel over rows. Each returns the per-row loss and d(loss)/d(student)."""

from pipeline.kernels.kl import kl_forward

__all__ = ["kl_forward"]

"""Offline knowledge distillation: run the teacher once, cache its logits, train many students."""

import os

# torch and Numba keep separate OpenMP pools. With busy-waiting (the default) both
# collapse, ~25x slower, when the VM gives the process one core instead of two;
# passive waiting was stable in both states. Must be set before either library loads.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

__version__ = "0.1.0"

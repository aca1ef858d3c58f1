"""Content hashes: what a dataset, a teacher, a config section or a file set is, as a
sha256 hex digest. Used for folder keys and fingerprints; depends on nothing else here."""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import Path


def plain(value):
    """A setting as JSON holds it: an enum member as its value (lists element by element),
    anything else as it is."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def hash_json(obj) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys; enums and paths via ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def hash_state_dict(model) -> str:
    """sha256 over a torch module's state_dict: sorted keys, dtype, shape and raw bytes."""
    import torch

    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def hash_files(files: list[Path]) -> str:
    """sha256 over each file's name and bytes, in the order given (read 16 MiB at a time)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()

"""Command line entry point: ``python -m pipeline.run [stage=1|2|3] [overrides]``.

The one module that imports ``stages/``. Hydra composes ``conf/config.yaml`` over the
typed schema in :mod:`pipeline.config`; :func:`pipeline.tasks.validate` rejects
out-of-range values before any stage starts.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline.cache.storage import check_writable, explain_os_error
from pipeline.config import Config, Stage, register
from pipeline.errors import UserError
from pipeline.processes import Processes, resolve_processes
from pipeline.tasks import validate
from pipeline.validation import check_overrides

# Set before torch or Numba load (neither is imported above the stages): the entry point
# owns the process's environment, the library never changes it.
ENVIRONMENT = {
    # torch and Numba keep separate OpenMP pools. With busy-waiting (the default) both collapse,
    # ~25x slower, when the VM gives the process one core instead of two; passive waiting was
    # stable in both states.
    "OMP_WAIT_POLICY": "passive",
    # models and tokenizers come from folders on disk: never ask a hub for anything
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    # oneDNN keeps up to 1024 compiled primitives per process by default, each holding its
    # scratch buffers; teacher batches come in a few padded shapes, so a few dozen suffice and
    # stage 1's resident memory stops growing with the corpus (bench/lm_corpus_memory.py)
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64",
}
# glibc serves a freed large block's size from the heap next time (its mmap threshold rises
# up to 32 MiB), so the teacher's logits and the capture's per-batch buffers end up scattered
# through a heap that never shrinks. A fixed threshold gives every block of 1 MiB or more its
# own mapping, returned to the system when freed.
MMAP_THRESHOLD = 1 << 20


def set_environment_defaults() -> None:
    """Fill in the process environment this project runs under (a value already set wins)."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    set_mmap_threshold(MMAP_THRESHOLD)
    late = [m for m in ("torch", "numba") if m in sys.modules]
    if late:
        logging.getLogger("pipeline.run").warning("environment defaults set after %s was imported: its "
                                                  "OpenMP settings may not apply", late)


def set_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold (``mallopt(M_MMAP_THRESHOLD)``); False where the C library
    is not glibc (macOS, musl), which keeps its own policy."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, nbytes))  # M_MMAP_THRESHOLD = -3 in <malloc.h>
    except (OSError, AttributeError):
        return False


log = logging.getLogger("pipeline.run")
register()


def dispatch(cfg: Config, run_dir: str, processes: Processes) -> None:
    from stages import audit, capture, distill

    steps = {Stage.capture: [capture], Stage.audit: [audit], Stage.distill: [distill]}
    for module in steps.get(cfg.stage, [capture, audit, distill]):
        module.main(cfg, run_dir, processes)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    cfg: Config = OmegaConf.to_object(dcfg)  # typed dataclasses, enums resolved
    try:
        validate(cfg)
        processes = resolve_processes(cfg, os.environ)  # the one read of torchrun's RANK / WORLD_SIZE
    except UserError as e:
        log.error("%s", e)
        raise SystemExit(2) from e
    run_dir = HydraConfig.get().runtime.output_dir
    log.info("run folder: %s", run_dir)
    try:
        dispatch(cfg, run_dir, processes)
    except UserError as e:  # what to fix, in one line; anything else is a bug and keeps its traceback
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s\n(set HYDRA_FULL_ERROR=1 for the traceback)", type(e).__name__, e)
        raise SystemExit(1) from e


def check_arguments(argv: list[str]) -> None:
    """What must be caught before Hydra composes anything: overrides of renamed keys (Hydra
    would only say the key is unknown), an unknown stage and an unwritable ``paths.root``."""
    try:
        check_overrides([a for a in argv if not a.startswith("-")])
    except UserError as e:
        print(f"[pipeline.run][ERROR] - {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    check_root(argv)


def check_root(argv: list[str]) -> None:
    """Hydra makes the run folder under ``paths.root`` before any of our code runs, and an
    unwritable root would end in its traceback: check it first, in one line."""
    root = next((a.split("=", 1)[1] for a in argv if a.startswith("paths.root=")), "data")
    if "," in root or "://" in root or "$" in root:
        return  # a sweep, a URL or an interpolation: validate() and Hydra say what is wrong
    path = os.path.abspath(os.path.expanduser(root))
    try:
        os.makedirs(path, exist_ok=True)  # Hydra would make it next anyway
        check_writable(path, "paths.root")
    except OSError as e:
        err = explain_os_error(e, path, "paths.root must be a writable folder: point it at one")
        print(f"[pipeline.run][ERROR] - {err if err is not e else f'cannot create paths.root={path}: {e}'}",
              file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    set_environment_defaults()
    check_arguments(sys.argv[1:])
    main()

"""Where this process stands in its job (rank, world size, whether torchrun launched it):
resolved once, at the entry point, from the config and torchrun's environment, and passed
down; the library reads no environment for it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import Config


@dataclass(frozen=True)
class Processes:
    """This run's place among the processes of one job, resolved once, at the entry point
    (:func:`resolve_processes`), and passed down: the library reads no environment for it."""

    rank: int = 0
    world_size: int = 1
    # launched by torchrun (WORLD_SIZE > 1 in its environment): stage 3 joins a process group
    # and trains one student across the processes
    torchrun: bool = False


def resolve_processes(cfg: Config, environ: Mapping[str, str] | None = None) -> Processes:
    """``rank`` / ``world_size`` from the config, else from torchrun's ``RANK`` / ``WORLD_SIZE``
    in ``environ`` (the entry point passes the process environment), else one process."""
    env = environ or {}
    try:
        env_world, env_rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
    except ValueError as e:
        raise ConfigError(f"RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r} in the environment: "
                          "expected integers (torchrun sets them)") from e
    world = cfg.world_size if cfg.world_size is not None else env_world
    rank = cfg.rank if cfg.rank is not None else env_rank
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"rank={rank}, world_size={world}: need world_size >= 1 and 0 <= rank < world_size")
    return Processes(rank, world, torchrun=env_world > 1)

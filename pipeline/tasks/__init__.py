"""Task plug-ins: what differs between a classifier and a language model, and nothing else.

A task (:class:`pipeline.tasks.base.Task`) says how its data is loaded, how its teacher
is obtained and turns into cache rows (a :class:`pipeline.capture.RowSource`), what a
cache row's label is, which students it trains and how it evaluates them. The capture
engine, the streams, the training loop, the audit and the objective are shared; the
stage recipes ask the registry for the task and never branch on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import ConfigError
from pipeline.hashing import plain

if TYPE_CHECKING:  # the plug-ins load torch: imported when a task is asked for, not before
    from pipeline.config import Config
    from pipeline.tasks.base import Task


def registry() -> dict[str, type[Task]]:
    from pipeline.tasks.classify import Classify
    from pipeline.tasks.lm import LanguageModel

    return {"classify": Classify, "lm": LanguageModel}


def task_for(cfg, processes=None) -> Task:
    """The plug-in of ``cfg.task``, bound to the run's config (and where this process
    stands in its job, :class:`pipeline.processes.Processes`)."""
    name = plain(cfg.task)
    tasks = registry()
    if name not in tasks:
        raise ConfigError(f"task={name!r}: expected one of {sorted(tasks)}")
    return tasks[name](cfg, processes)


def validate(cfg: Config) -> Config:
    """Check ranges and cross-field rules: the shared ones and the task's own; raise one
    ValueError listing every problem."""
    from pipeline.validation import section_problems, shared_problems

    def refuse(p: list[str]) -> None:
        if p:
            raise ConfigError("invalid config (" + str(len(p)) + " problem(s)):\n  - " + "\n  - ".join(p))

    refuse(section_problems(cfg))  # first: the checks below read the task's own fields
    p = shared_problems(cfg)
    registry()[plain(cfg.task)].validate(cfg, p)
    refuse(p)
    return cfg


__all__ = ["registry", "task_for", "validate"]

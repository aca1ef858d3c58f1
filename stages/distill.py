"""Stage 3: train the configured students against the cache; write ``results.json``,
student checkpoints and a results table. Never loads the teacher."""

from __future__ import annotations

import json
import logging
import os

from pipeline.config import Config
from pipeline.processes import Processes
from pipeline.students import train_students
from pipeline.tasks import task_for
from pipeline.training import is_main_process, leave_process_group

log = logging.getLogger(__name__)


def main(cfg: Config, run_dir: str, processes: Processes | None = None) -> list[dict]:
    task = task_for(cfg, processes)
    data = task.load_data()
    reader = task.open_cache(data)
    rows = train_students(task, data, reader, run_dir)
    if not is_main_process():  # under torchrun, rank 0 reports
        leave_process_group()
        return rows
    extra, table = task.results(rows, reader)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump({"cache": reader.path, **extra, "students": rows}, f, indent=2)
    print("\n" + table, flush=True)
    task.publish(rows, reader)
    log.info("results: %s", os.path.join(run_dir, "results.json"))
    leave_process_group()
    return rows

"""A CSV tracker for accelerate (``Accelerator(log_with=[CSVTracker(path)])``): one row per logged step.

Columns are ``step`` plus every key logged so far (a new key rewrites the file with the wider header).
``keep_until`` keeps the rows of an existing file up to that step (a resumed run continues its own log)
and drops the rest; without it an existing file is replaced.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from accelerate.tracking import GeneralTracker


class CSVTracker(GeneralTracker):
    name = "csv"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | os.PathLike, keep_until: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.keep_until = keep_until
        self.columns: list[str] = ["step"]
        self.rows: list[dict] = []
        self.started = False  # the file is read and rewritten at the first log: on the main process only

    def _start(self):
        self.started = True
        if self.keep_until is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [r for r in reader if r.get("step") and int(r["step"]) <= self.keep_until]
        self._rewrite()

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=1, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs):
        if not self.started:
            self._start()
        row = {"step": step, **{k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))}}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)

    def _rewrite(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)

    def finish(self):
        pass

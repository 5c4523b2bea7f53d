"""The metrics log: `metrics.jsonl`, one JSON object per training step (or eval), each with an int
"step". Appended and flushed record by record, so a crash loses at most the record being written;
that truncated last line is skipped, with a warning, when the log is read or reopened."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Union

from ._atomic import atomic_open

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends records to the JSON-lines file `path` (created with its directory when missing).

    Opening a log whose last line was cut off by a crash drops that line first, so that new records
    start on a line of their own. Values are written as strict JSON: NaN and ±inf become null,
    numpy/torch scalars become numbers (anything with `.item()` / `.tolist()`).
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open("rb") as f:
                f.seek(-1, 2)
                cut_off = f.read(1) != b"\n"
            if cut_off:
                self._rewrite(read_metrics(self.path))

    def log(self, record: dict) -> None:
        """Appends `record`; it must hold an int "step"."""
        if not _is_record(record):
            raise ValueError(f"record must be a dict with an int 'step', got {record!r}")
        line = json.dumps(_jsonable(record), allow_nan=False)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")

    def records(self) -> list[dict]:
        return read_metrics(self.path) if self.path.exists() else []

    def truncate_after(self, step: int) -> int:
        """For `--resume` from the checkpoint of `step`: drops the records with a larger step
        (written after that checkpoint) and returns how many were dropped."""
        records = self.records()
        kept = [r for r in records if r["step"] <= step]
        self._rewrite(kept)
        return len(records) - len(kept)

    def _rewrite(self, records: list[dict]) -> None:
        with atomic_open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in records)


def read_metrics(path: Union[str, Path]) -> list[dict]:
    """The records of a metrics log, in file order. Blank lines are skipped; an unreadable last
    line (a crash mid-write) is skipped with a warning; an unreadable line before it, or a record
    without an int "step", raises ValueError naming the file and line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = None if _is_record(record) else "expected a JSON object with an int 'step'"
        except json.JSONDecodeError as e:
            problem = f"not JSON: {e}"
        if problem is None:
            records.append(record)
        elif i == last:
            warnings.warn(f"{path}:{i + 1}: skipping a truncated last record ({problem})",
                          stacklevel=2)
        else:
            raise ValueError(f"{path}:{i + 1}: {problem}")
    return records


def _is_record(record: Any) -> bool:
    step = record.get("step") if isinstance(record, dict) else None
    return isinstance(step, int) and not isinstance(step, bool)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy / torch values
        return _jsonable(value.tolist())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

"""Run records: the resolved config.toml, metrics.jsonl, and TensorBoard / W&B when asked for.

metrics.jsonl holds one JSON object per line: {"step": N, "loss": ..., ...}. A resumed run first
drops the records a crashed run wrote after its checkpoint, so the file stays one history.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .config import TrainConfig, to_toml
from .errors import UserError, one_line
from .files import WriteError, atomic_write
from .optional import require

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist: is {run_dir} a gpt2train run directory?")
    records, damaged = _read_records(path)
    if damaged:
        raise UserError(f"{path} is damaged ({damaged[0]}): delete the damaged lines to use the rest")
    return records


def _read_records(path: Path) -> tuple[list[dict], list[str]]:
    """The records of a metrics file, and what is wrong with each line that is not one."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    records, damaged = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            damaged.append(f"line {number} is not a record")
    return records, damaged


class RunRecorder:
    """Writes a run's records as it goes; `close()` when the run ends.

    Records are not worth a run: a record that cannot be written (a full disk) is said in one line
    through `log`, and the run goes on without that kind of record. metrics.jsonl keeps every line
    written in full before the failure."""

    def __init__(self, config: TrainConfig, resumed_step: int = 0, log: Callable[[str], None] = print):
        self.run_dir, self.log = Path(config.run_dir), log
        self.metrics: BinaryIO | None = None
        self.tensorboard = self.wandb = None
        path = self.run_dir / METRICS_FILE
        try:
            atomic_write(self.run_dir / CONFIG_FILE, lambda f: f.write(to_toml(config).encode()))
            kept, damaged = _read_records(path) if path.exists() else ([], [])
            kept = [r for r in kept if r["step"] <= resumed_step]
            atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
            self.metrics = path.open("ab", buffering=0)  # unbuffered: a failed write is seen at once, and undone
        except UserError as e:
            self._lost("records", e)
        else:
            if damaged:
                log(f"{path} was damaged ({len(damaged)} line(s) not records, the first: {damaged[0]}): kept its "
                    f"{len(kept)} readable record(s)")
        if config.tensorboard:
            try:
                self.tensorboard = _tensorboard_writer(self.run_dir)
            except OSError as e:
                self._lost("TensorBoard events", e)
        self.wandb = _wandb_run(config) if config.wandb else None

    def record(self, step: int, **values: float) -> None:
        # JSON has no NaN or infinity; a non-finite loss is written as null.
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in values.items()}
        if self.metrics is not None:
            self._append(json.dumps({"step": step, **clean}) + "\n")
        if self.tensorboard is not None:
            try:
                for key, value in clean.items():
                    if value is not None:
                        self.tensorboard.add_scalar(key, value, step)
            except Exception as e:  # noqa: BLE001 - its writer thread's failures come back as any exception
                self.tensorboard = None
                self._lost("TensorBoard events", e)
        if self.wandb is not None:
            self.wandb.log(clean, step=step)

    def _append(self, line: str) -> None:
        """Add a line to metrics.jsonl, or, if it cannot be written in full, none of it."""
        start = self.metrics.tell()
        data = memoryview(line.encode())
        try:
            while len(data):
                data = data[self.metrics.write(data):]
        except OSError as e:
            self.metrics.truncate(start)  # a half-written line would make the file unreadable
            self.metrics.close()
            self.metrics = None
            self._lost("metrics", WriteError(self.run_dir / METRICS_FILE, e.strerror or str(e), e.errno))

    def _lost(self, what: str, error: Exception) -> None:
        self.log(f"warning: {what} not kept from here on ({one_line(error)}); training goes on")

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.tensorboard is not None:
            try:
                self.tensorboard.close()
            except Exception as e:  # noqa: BLE001 - as in record()
                self._lost("TensorBoard events", e)
        if self.wandb is not None:
            self.wandb.finish()


def _tensorboard_writer(run_dir: Path):
    tensorboard = require("torch.utils.tensorboard", "--tensorboard", "tensorboard", needs="the tensorboard package")
    _quiet_tensorboard_threads()
    return tensorboard.SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _quiet_tensorboard_threads() -> None:
    """TensorBoard writes events on a thread of its own, which prints a traceback when a write fails (a
    full disk) and hands the error to the writer's next call, in record() or close(), where it is said in
    one line: the thread's traceback is left unsaid."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    hook.quiets_tensorboard = True
    threading.excepthook = hook


def _wandb_run(config: TrainConfig):
    wandb = require("wandb", "--wandb", "wandb", then=", then `wandb login`")
    # One W&B run per run directory, so that a resumed run continues its W&B run.
    run_id = hashlib.sha256(str(Path(config.run_dir).resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=config.wandb_project, name=Path(config.run_dir).name, id=run_id, resume="allow",
                      config=config.to_flat_dict(), dir=str(config.run_dir))

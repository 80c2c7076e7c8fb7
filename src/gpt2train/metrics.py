"""Run records: the resolved config.toml, metrics.jsonl, and TensorBoard / W&B when asked for.

metrics.jsonl holds one JSON object per line: {"step": N, "loss": ..., ...}. A resumed run first
drops the records a crashed run wrote after its checkpoint, so the file stays one history.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from .config import TrainConfig, to_toml
from .errors import UserError
from .files import atomic_write
from .optional import require

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist: is {run_dir} a gpt2train run directory?")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


class RunRecorder:
    """Writes a run's records as it goes; `close()` when the run ends."""

    def __init__(self, config: TrainConfig, resumed_step: int = 0):
        self.run_dir = Path(config.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.run_dir / CONFIG_FILE, lambda f: f.write(to_toml(config).encode()))
        metrics = self.run_dir / METRICS_FILE
        kept = [r for r in read_metrics(self.run_dir) if r["step"] <= resumed_step] if metrics.exists() else []
        atomic_write(metrics, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
        self.metrics = metrics.open("a", encoding="utf-8")
        self.tensorboard = _tensorboard_writer(self.run_dir) if config.tensorboard else None
        self.wandb = _wandb_run(config) if config.wandb else None

    def record(self, step: int, **values: float) -> None:
        # JSON has no NaN or infinity; a non-finite loss is written as null.
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in values.items()}
        self.metrics.write(json.dumps({"step": step, **clean}) + "\n")
        self.metrics.flush()
        if self.tensorboard is not None:
            for key, value in clean.items():
                if value is not None:
                    self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(clean, step=step)

    def close(self) -> None:
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _tensorboard_writer(run_dir: Path):
    tensorboard = require("torch.utils.tensorboard", "--tensorboard", "tensorboard", needs="the tensorboard package")
    return tensorboard.SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _wandb_run(config: TrainConfig):
    wandb = require("wandb", "--wandb", "wandb", then=", then `wandb login`")
    # One W&B run per run directory, so that a resumed run continues its W&B run.
    run_id = hashlib.sha256(str(Path(config.run_dir).resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=config.wandb_project, name=Path(config.run_dir).name, id=run_id, resume="allow",
                      config=config.to_flat_dict(), dir=str(config.run_dir))

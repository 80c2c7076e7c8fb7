"""loss.png: a run's train and validation loss against steps, with its target."""

from __future__ import annotations

import threading
from pathlib import Path

from .config import load_toml
from .errors import UserError
from .files import atomic_write
from .metrics import CONFIG_FILE, read_metrics
from .optional import require

PLOT_FILE = "loss.png"


def warm_up() -> None:
    """Import matplotlib on a thread of its own, if it is installed, so that the plot at the end of a
    run does not wait for the import (about a second)."""

    def load() -> None:
        try:
            _pyplot()
        except UserError:  # not installed: the end of the run says so
            pass

    threading.Thread(target=load, daemon=True, name="gpt2train-plot-import").start()


def _pyplot():
    matplotlib = require("matplotlib", "drawing loss.png", "plot", needs="matplotlib")
    matplotlib.use("Agg")  # files only: no display needed
    return require("matplotlib.pyplot", "drawing loss.png", "plot", needs="matplotlib")


def plot_run(run_dir: str | Path) -> Path:
    """Draw run_dir/loss.png from its metrics.jsonl and config.toml; returns the path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    config = load_toml(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).is_file() else {}
    plt = _pyplot()

    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train and not val:
        raise UserError(f"{run_dir} has no losses recorded yet: plot it after its first logged step")
    fig, ax = plt.subplots(figsize=(8, 5))
    curves = {}
    if train:
        curves["train"] = ax.plot(*zip(*train), label="train loss", linewidth=1)[0]
    if val:
        curves["val"] = ax.plot(*zip(*val), "o-", label="validation loss", markersize=3)[0]
    target = config.get("target_loss")
    if target:
        # The target line takes the colour of the curve it applies to.
        on = "val" if config.get("target_metric") == "val" else "train"
        color = curves[on].get_color() if on in curves else "gray"
        ax.axhline(target, color=color, linestyle="--", linewidth=1,
                   label=f"target {target} ({'validation' if on == 'val' else 'train'} loss)")
        metric = val if on == "val" else train
        reached = next((step for step, loss in metric if loss < target), None)
        if reached is not None:
            ax.axvline(reached, color="green", linestyle=":", linewidth=1, label=f"target reached at step {reached:,}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_yscale("log")
    ax.set_title(f"{run_dir.name} ({config['preset']} preset)" if "preset" in config else run_dir.name)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path = run_dir / PLOT_FILE
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path

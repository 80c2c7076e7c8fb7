"""loss.png: a run's train and validation loss against steps, with its target; below them, when the run
scored benchmark tasks (--eval-tasks), their accuracies."""

from __future__ import annotations

import io
import threading
from pathlib import Path

from .config import load_toml
from .errors import UserError, one_line
from .files import atomic_write
from .metrics import CONFIG_FILE, read_metrics
from .optional import require

PLOT_FILE = "loss.png"
# The accuracies metrics.jsonl may hold (`<task>_<figure>`), with their legend labels.
ACCURACIES = {"hellaswag_acc_norm": "HellaSwag acc_norm", "hellaswag_acc": "HellaSwag acc",
              "hellaswag_acc_norm_completion": "HellaSwag acc_norm, completion style"}

_warming: threading.Thread | None = None  # the drawing that warm_up() started, while it runs
_warm_up_failed: Exception | None = None  # what made it fail, other than matplotlib not being installed


def warm_up() -> None:
    """Import matplotlib and draw a throwaway plot on a thread of its own, if matplotlib is installed,
    so that the plot at the end of a run waits neither for the import (about a second) nor for the
    fonts, text layout and tick formats that a process's first drawing sets up (about half a second)."""
    global _warming

    def draw() -> None:
        global _warm_up_failed
        try:
            _save(_figure("warm-up", {"target_loss": 0.5}, [(1, 10.0), (50, 0.4)], [(50, 0.6)], {}), io.BytesIO())
        except UserError:  # not installed: the end of the run says so
            pass
        except Exception as e:  # noqa: BLE001 - said by the plot it was for, in one line
            _warm_up_failed = e

    _warming = threading.Thread(target=draw, daemon=True, name="gpt2train-plot-warm-up")
    _warming.start()


def plot_run(run_dir: str | Path) -> Path:
    """Draw run_dir/loss.png from its metrics.jsonl and config.toml; returns the path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    config = load_toml(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).is_file() else {}
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    accuracies = {key: [(r["step"], r[key]) for r in records if r.get(key) is not None] for key in ACCURACIES}
    if not train and not val:
        raise UserError(f"{run_dir} has no losses recorded yet: plot it after its first logged step")
    if _warming is not None:
        _warming.join()  # matplotlib draws one figure at a time
    if _warm_up_failed is not None:  # importing matplotlib again after a failed import may fail another way
        raise UserError(f"matplotlib failed to draw ({type(_warm_up_failed).__name__}: {one_line(_warm_up_failed)}): "
                        f"draw the plot later with `gpt2train plot {run_dir}`")
    title = f"{run_dir.name} ({config['preset']} preset)" if "preset" in config else run_dir.name
    figure = _figure(title, config, train, val, {key: points for key, points in accuracies.items() if points})
    path = run_dir / PLOT_FILE
    atomic_write(path, lambda f: _save(figure, f))
    return path


def _figure(title: str, config: dict, train: list[tuple], val: list[tuple], accuracies: dict[str, list[tuple]]):
    """The plot of these (step, loss) curves, with the target that `config` sets, and a panel of (step,
    accuracy) curves below when there are any."""
    # matplotlib's object API: no pyplot, so no GUI backend, no global figure registry, nothing to close.
    require("matplotlib", "drawing loss.png", "plot", needs="matplotlib")
    from matplotlib.figure import Figure

    if accuracies:
        fig = Figure(figsize=(8, 8))
        ax, below = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
        for key, points in accuracies.items():
            below.plot(*zip(*points), "o-", label=ACCURACIES[key], markersize=3)
        below.axhline(0.25, color="gray", linestyle=":", linewidth=1, label="chance (1 in 4)")
        below.set_xlabel("step")
        below.set_ylabel("accuracy")
        below.grid(True, alpha=0.3)
        below.legend()
    else:
        fig = Figure(figsize=(8, 5))
        ax = fig.subplots()
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
    if not accuracies:
        ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def _save(fig, f) -> None:
    fig.savefig(f, format="png", dpi=120, bbox_inches="tight")

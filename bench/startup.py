"""Start-up and the end of a run, timed as whole processes against the plain script (bench/plain_step.py).

    .venv/bin/python bench/startup.py [--rounds 3]

Alternates, ROUNDS times, in fresh directories with a warm token cache:
  gpt2train  `gpt2train train --device cpu --dtype float32 --max-steps 1 --batch-size 1 --seq-len 32
             --target-loss 100 --eval-interval 0` (one step of GPT-2 124M, then its final model)
  plain      `python bench/plain_step.py` (the same work as one short script)
  tiny       `gpt2train train --preset tiny --device cpu --dtype float32` (to its target)
and prints, for each, the median seconds from launch to `Final model saved at:` (plain: `saved`), to
`Target loss achieved!` and to exit, then the ratios the targets in BENCHMARKS.md are stated in. Every
process gets the same OMP_NUM_THREADS (all cores, or --threads N), so that both sides compute alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import ROOT, TARGET_LINE, Launched, child_env

PYTHON = sys.executable
CPU = ["--device", "cpu", "--dtype", "float32"]
COMMANDS = {
    "gpt2train": [PYTHON, "-m", "gpt2train", "train", *CPU, "--max-steps", "1", "--batch-size", "1", "--seq-len", "32",
                  "--target-loss", "100", "--eval-interval", "0"],
    "plain": [PYTHON, str(ROOT / "bench" / "plain_step.py"), "plain_model"],
    "tiny": [PYTHON, "-m", "gpt2train", "train", "--preset", "tiny", *CPU],
}
MARKS = {"saved": ("Final model saved at:", "saved"), "target": TARGET_LINE}


def timed(command: list[str], env: dict) -> dict[str, float]:
    """Seconds from launch to the first line starting with each mark, and to exit, in a fresh directory."""
    work = Path(tempfile.mkdtemp(prefix="gpt2train-startup-"))
    try:
        run = Launched(command, cwd=work, env=env)
        if run.wait() != 0:
            raise RuntimeError(f"{' '.join(command)} exited with {run.proc.returncode}:\n{run.text}")
        seen = {mark: seconds for mark, prefixes in MARKS.items() if (seconds := run.first(prefixes)) is not None}
        return {**seen, "exit": run.exit_s}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of every process (default: all cores)")
    args = parser.parse_args()
    cores = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    env = child_env(OMP_NUM_THREADS=str(cores))
    timed(COMMANDS["tiny"], env)  # fills the token cache, as any earlier run would have
    runs: dict[str, list[dict]] = {name: [] for name in COMMANDS}
    for round_ in range(args.rounds):
        for name, command in COMMANDS.items():
            runs[name].append(timed(command, env))
            print(f"round {round_ + 1} {name:9s} " + "  ".join(f"{k} {v:6.2f} s" for k, v in runs[name][-1].items()),
                  flush=True)
    median = {name: {mark: statistics.median(r[mark] for r in rs) for mark in rs[0]} for name, rs in runs.items()}
    print(f"\nmedians over {args.rounds} rounds, {cores} threads, torch from {PYTHON}")
    for name, marks in median.items():
        print(f"  {name:9s} " + "  ".join(f"{k} {v:6.2f} s" for k, v in marks.items()))
    # Each ratio from the runs of one round, side by side, then their median: the VM drifts between rounds.
    per_round = lambda f: statistics.median(f(a, b) for a, b in zip(runs["gpt2train"], runs["plain"]))
    print(f"one 124M step, launch to `Final model saved at:`: {per_round(lambda a, b: a['saved'] / b['saved']):.2f}x "
          "the plain script (median of the rounds' ratios; target <= 0.8x)")
    print(f"one 124M step, launch to exit: {per_round(lambda a, b: a['exit'] / b['exit']):.2f}x the plain script "
          "(target <= 1.2x)")
    after = statistics.median(r["exit"] - r["target"] for r in runs["tiny"])
    print(f"tiny preset, launch to exit: {after:+.2f} s after `Target loss achieved!` (median; target <= +1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

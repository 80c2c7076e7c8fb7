"""Steps to the default target (training loss < 0.099999) for each recipe, over several seeds.

    .venv/bin/python bench/recipe.py                 # the CPU proxy: about 2 hours on a 2-core CPU
    .venv/bin/python bench/recipe.py --gpu           # GPT-2 124M on the built-in corpus, on a CUDA GPU

Recipes, each a `gpt2train train` command of its own:
  seed        the defaults: AdamW 6e-4, 2,000 warmup steps, cosine to 6e-5 at 20,000
  adamw-fast  the fast recipe's warmup and schedule with AdamW alone (`--preset gpt2-fast --optimizer adamw`)
  fast        `--preset gpt2-fast`: Muon on the blocks' matrices, AdamW on the rest, wsd tied to the target
The CPU proxy is a small GPT-2 (2 layers, 4 heads, 128 wide, context 64, the full 50,304 vocabulary),
batch 8 x 64, on the first 8,192 tokens of the built-in corpus, fp32. Prints each run's steps to the
target and seconds per step, then per recipe the steps of every seed, their median and spread, and
the ratios the targets in BENCHMARKS.md are stated in.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpt2train.training.report import parse_step_lines

PROXY = ["--device", "cpu", "--dtype", "float32", "--n-layer", "2", "--n-head", "4", "--n-embd", "128",
         "--block-size", "64", "--seq-len", "64", "--batch-size", "8", "--train-tokens", "8192"]
RECIPES = {"seed": [], "adamw-fast": ["--preset", "gpt2-fast", "--optimizer", "adamw"], "fast": ["--preset", "gpt2-fast"]}


def steps_to_target(recipe: list[str], shape: list[str], seed: int) -> tuple[int | None, float]:
    """(the step that reached the target or None, seconds per step) of one run."""
    work = Path(tempfile.mkdtemp(prefix="gpt2train-recipe-"))
    try:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "gpt2train", "train", *recipe, *shape, "--seed", str(seed),
                               "--eval-interval", "0", "--log-interval", "100000", "--run-dir", str(work / "run"),
                               "--out-dir", str(work / "out")], capture_output=True, text=True, cwd=work)
        seconds = time.perf_counter() - started
        steps = [s.step for s in parse_step_lines(done.stdout)]
        if done.returncode not in (0, 3) or not steps:
            raise RuntimeError(f"run failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        return (steps[-1] if done.returncode == 0 else None), seconds / steps[-1]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--gpu", action="store_true", help="GPT-2 124M on a CUDA GPU instead of the CPU proxy")
    args = parser.parse_args()
    shape = ["--device", "cuda"] if args.gpu else PROXY
    found: dict[str, list[int | None]] = {}
    for name in args.recipes:
        found[name] = []
        for seed in args.seeds:
            steps, per_step = steps_to_target(RECIPES[name], shape, seed)
            found[name].append(steps)
            print(f"{name:10s} seed {seed:5d}: {'not reached' if steps is None else f'{steps:,} steps'} "
                  f"({per_step * 1000:.0f} ms/step)", flush=True)
    print(f"\nsteps to the target ({'GPT-2 124M, GPU' if args.gpu else 'CPU proxy'}), seeds {args.seeds}")
    medians = {}
    for name, steps in found.items():
        reached = [s for s in steps if s is not None]
        medians[name] = statistics.median(reached) if len(reached) == len(steps) else None
        spread = max(reached) - min(reached) if reached else 0
        print(f"  {name:10s} {' / '.join('-' if s is None else f'{s:,}' for s in steps)}   median "
              f"{'-' if medians[name] is None else f'{medians[name]:,.0f}'}   spread {spread:,}")
    fast, seed, adamw = medians.get("fast"), medians.get("seed"), medians.get("adamw-fast")
    if fast and seed:
        print(f"fast / seed: {fast / seed:.3f} (target <= 0.25)")
    if fast and adamw:
        print(f"fast / adamw-fast (Muon's own share): {fast / adamw:.3f} (target <= 0.75)")
    if adamw and seed:
        print(f"adamw-fast / seed: {adamw / seed:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

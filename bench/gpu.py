"""The GPU speed figures and their targets (BENCHMARKS.md), from a checkout, offline, in at most ~7 minutes.

    bash bench/gpu.sh gpu-logs                              # on a machine with one CUDA GPU, in the checkout
    .venv/bin/python bench/gpu.py --smoke /tmp/gpu-smoke    # every part on a CPU, tiny models

Needs python with torch (CUDA), numpy, tiktoken and pytest; no network. bench/gpu.sh installs the other
pure-Python dependencies from the wheels in .whl/ into .site/ and runs this script with .site and src
on the path, so that nothing is installed outside the checkout.

Parts, each under its own time limit, its logs in LOGDIR (a part that fails or runs out of time is
reported FAIL and the others still run):
  a. `gpt2train bench` at batch 8 x 1024 (--steps 30 --warmup 8), each variant a process of its own
     (bench-*.json): gpt2train, compiled (the standard compiled recipe), and gpt2train with each lever:
     --fused-loss (its peak memory against the 4.5 GB target), --compile-blocks (its compile and
     warm-up time beside the others'), --compile-mode reduce-overhead (CUDA graphs), and the step with
     --optimizer muon (gpt2train-muon, against the 1.15x target). --full adds 32 x 1024 (--steps 15
     --warmup 5) for gpt2train and compiled, gpt2train-deterministic, --compile-mode
     max-autotune-no-cudagraphs and the eager variant at 8 x 1024.
  b. time to target: `gpt2train train` with all defaults in a fresh directory, cold (an empty
     TORCHINDUCTOR_CACHE_DIR) and then warm (the same cache), then `--preset gpt2-fast` warm, every
     output line time-stamped from launch (ttt-cold.log, ttt-warm.log, ttt-fast.log).
  c. determinism, with --deterministic: runs A and B from scratch (side by side, each with a cold
     compile cache of its own) and run C, killed with SIGKILL right after its step-N checkpoint and
     resumed from it; every logged loss of B and of C must equal A's, and so must the weights in their
     last checkpoints (the runs end at max steps, so they write no final model) (det-*.log).
  d. `python -m pytest -m gpu -q` (with -n 4 where pytest-xdist is installed), alongside part c, which
     times nothing (pytest.log).
  e. HellaSwag scoring: bench/hellaswag.py on GPT-2 124M in bf16 over 10,042 items of HellaSwag's shape
     (the validation set's size; made from the built-in corpus, since the machine has no network),
     against the 20 s target (hellaswag.log).
Last, a Markdown table of every figure with PASS/FAIL against the targets, also in LOGDIR/summary.md.
Exit status: 0 when every judged row passes, 1 otherwise.

--smoke runs every part end to end on a CPU in a few minutes: the tiny preset, a few steps, a target it
reaches in seconds, pytest's GPU tests skipped. Its figures are not GPU figures and are not judged
against the targets; the determinism checks are. It is how this script is kept working without a GPU:
run it after changing the script or the commands and output it relies on.
--budget (seconds; default 400, 1200 with --smoke) bounds the whole script: each part gets at most what
is left of it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from common import ROOT, TARGET_LINE, TIMED_OUT, Launched, child_env

from gpt2train.training.report import parse_step_lines

PYTHON = sys.executable
RESERVE = 15  # seconds of the budget kept for the summary


@dataclass(frozen=True)
class Plan:
    """The commands of a run of this script: GPT-2 124M on a GPU, or tiny models on a CPU (--smoke)."""

    bench: list[str]  # every `gpt2train bench` variant's
    bench_8: list[str]  # the 8 x 1024 rows' steps
    bench_32: list[str]  # the 32 x 1024 rows' batch and steps
    target_run: list[str]  # the runs timed to their target
    fast_run: list[str]
    det_run: list[str]  # the determinism runs' model and device
    det_checkpoint: int  # the step after whose checkpoint run C is killed
    det_max: int
    hellaswag: list[str]  # bench/hellaswag.py's flags

    @property
    def det_flags(self) -> list[str]:
        return [*self.det_run, "--max-steps", str(self.det_max), "--checkpoint-interval", str(self.det_checkpoint),
                "--deterministic", "--target-loss", "0.000001", "--log-interval", "1", "--eval-interval", "0",
                "--keep-checkpoints", "5", "--run-dir", "run", "--out-dir", "out"]


GPU = Plan(bench=["--device", "cuda"], bench_8=["--steps", "30", "--warmup", "8"],
           bench_32=["--batch-size", "32", "--steps", "15", "--warmup", "5"],
           target_run=[],  # all defaults: the default run
           fast_run=["--preset", "gpt2-fast"], det_run=["--device", "cuda"], det_checkpoint=100, det_max=200,
           hellaswag=["--device", "cuda", "--dtype", "bfloat16", "--limit", "10042", "--skip-harness"])
SMOKE = Plan(bench=["--device", "cpu", "--preset", "tiny"], bench_8=["--steps", "3", "--warmup", "2"],
             bench_32=["--batch-size", "32", "--steps", "2", "--warmup", "1"],
             target_run=["--device", "cpu", "--preset", "tiny", "--target-loss", "7.0"],
             fast_run=["--device", "cpu", "--preset", "gpt2-fast", "--n-layer", "2", "--n-head", "4", "--n-embd", "128",
                       "--block-size", "64", "--seq-len", "64", "--train-tokens", "1024", "--target-loss", "7.0"],
             # The tests' model (seconds for 60 steps), so that runs side by side fit on a 2-core machine.
             det_run=["--device", "cpu", "--preset", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
                      "--block-size", "32", "--seq-len", "32", "--batch-size", "4"],
             det_checkpoint=20, det_max=60,
             hellaswag=["--device", "cpu", "--dtype", "float32", "--limit", "2", "--skip-harness"])
# A bench row's name is VARIANT or VARIANT+LEVER: gpt2train's variant with one lever's flags.
LEVERS = {"fused": ["--fused-loss"], "blocks": ["--compile-blocks"], "graphs": ["--compile-mode", "reduce-overhead"],
          "autotune": ["--compile-mode", "max-autotune-no-cudagraphs"]}
ROWS = [("8x1024", "gpt2train"), ("8x1024", "compiled"), ("8x1024", "gpt2train+fused"), ("8x1024", "gpt2train+blocks"),
        ("8x1024", "gpt2train+graphs"), ("8x1024", "gpt2train-muon")]
FULL_ROWS = [("32x1024", "gpt2train"), ("32x1024", "compiled"), ("8x1024", "gpt2train-deterministic"),
             ("8x1024", "gpt2train+autotune"), ("8x1024", "eager")]
HELLASWAG_SECONDS = 20.0  # the whole validation set on one GPU
# Time to target: (name, what the row says, the target in seconds).
TARGET_RUNS = [("cold", "cold compile cache", 40.0), ("warm", "warm compile cache", 30.0),
               ("fast", "--preset gpt2-fast, warm cache", 15.0)]


class Budget:
    """The seconds the whole script may take, handed out part by part."""

    def __init__(self, seconds: float):
        self.seconds, self.started = seconds, time.monotonic()

    def left(self, cap: float) -> float:
        """Seconds a part may take: at most `cap`, and no more than the budget has left (but 5 at least)."""
        return max(5.0, min(cap, self.seconds - (time.monotonic() - self.started) - RESERVE))

    def note(self, what: str) -> None:
        print(f"[{time.monotonic() - self.started:4.0f}s] {what}", flush=True)


def gpt2train(*args: str) -> list[str]:
    return [PYTHON, "-m", "gpt2train", *args]


def environment(smoke: bool) -> dict[str, str]:
    """What the figures were measured on, as env.txt lists it."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    except OSError:  # no git on the machine
        commit = ""
    env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "commit": commit.strip() or "unknown",
           "smoke": str(int(smoke)), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(0).total_memory // 2**20
        env["device"] = f"{torch.cuda.get_device_name()} ({memory:,} MiB)"
        env["cuda"] = f"{torch.version.cuda} | cudnn: {torch.backends.cudnn.version()}"
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


# --- a. bench -----------------------------------------------------------------------------------------

@dataclass
class BenchRow:
    status: int
    report: dict | None  # the variant's figures and its shape ("8x1024"); None when it gave none


def bench(plan: Plan, budget: Budget, log: Path, work: Path, size: str, name: str) -> BenchRow:
    """One variant in a process of its own: bench-SIZE-NAME.json (and .err)."""
    variant, _, lever = name.partition("+")
    budget.note(f"bench {size} {name}")
    steps = plan.bench_8 if size == "8x1024" else plan.bench_32
    run = Launched(gpt2train("bench", *plan.bench, *steps, *LEVERS.get(lever, []), "--variant", variant, "--json"),
                   env=child_env(TORCHINDUCTOR_CACHE_DIR=str(work / "inductor-bench")),
                   stderr=log / f"bench-{size}-{name}.err", timeout=budget.left(120))
    status = run.wait()
    (log / f"bench-{size}-{name}.json").write_text(run.text)
    try:
        report = json.loads(run.text)
        return BenchRow(status, {**report["variants"][0], "shape": f"{report['batch_size']}x{report['seq_len']}"})
    except (ValueError, KeyError, IndexError):
        return BenchRow(status, None)


# --- b. time to target --------------------------------------------------------------------------------

@dataclass
class TargetRun:
    status: int
    exit_s: float
    header_s: float | None  # seconds from launch to the header's first line
    estimate_s: float | None  # to the first time estimate
    target_s: float | None  # to TARGET_LINE
    last_step: int | None


def time_to_target(budget: Budget, log: Path, work: Path, name: str, flags: list[str]) -> TargetRun:
    """`gpt2train train FLAGS` in a fresh directory, timed from launch (ttt-NAME.log); the compile cache is
    shared by the runs, so that the first is cold and the others warm."""
    budget.note(f"time to target, {name}")
    directory = work / f"ttt-{name}"
    directory.mkdir()
    run = Launched(gpt2train("train", *flags), cwd=directory, log=log / f"ttt-{name}.log",
                   env=child_env(TORCHINDUCTOR_CACHE_DIR=str(work / "inductor-ttt")), timeout=budget.left(150))
    status = run.wait()
    shutil.rmtree(directory)  # its checkpoint and final model
    steps = parse_step_lines(run.text)
    return TargetRun(status, run.exit_s, run.first("device: "), run.first("estimated time to max steps"),
                     run.first(TARGET_LINE), steps[-1].step if steps else None)


# --- c. determinism -----------------------------------------------------------------------------------

def determinism(plan: Plan, budget: Budget, log: Path, work: Path) -> dict:
    """Runs A and B side by side, then C, killed after its checkpoint at plan.det_checkpoint and resumed;
    their logged losses and last weights compared (det-*.log)."""

    def start(name: str, cache: str, args: list[str], timeout: float | None, **env: str) -> Launched:
        directory = work / f"det-{name[0]}"
        directory.mkdir(exist_ok=True)
        return Launched(gpt2train("train", *args), cwd=directory, log=log / f"det-{name}.log", timeout=timeout,
                        env=child_env(TORCHINDUCTOR_CACHE_DIR=str(work / f"inductor-det-{cache}"), **env))

    budget.note("determinism: runs A and B side by side")
    a = start("a", "a", plan.det_flags, budget.left(200))
    b = start("b", "b", plan.det_flags, budget.left(200))
    status = {"a": a.wait(), "b": b.wait()}

    budget.note(f"determinism: run C, killed with SIGKILL after its step-{plan.det_checkpoint} checkpoint")
    # Compiled kernels from A's cache, compiled in-process so that no compile worker outlives the kill.
    c = start("c", "a", plan.det_flags, None, TORCHINDUCTOR_COMPILE_THREADS="1")
    saved = c.wait_for(rf"checkpoint saved: .*step_{plan.det_checkpoint:08d}\.pt", budget.left(200))
    c.kill()
    status["c"] = c.wait()
    budget.note("determinism: run C resumed")
    resumed = start("c-resumed", "a", ["--resume", "run"], budget.left(200))
    status["c-resumed"] = resumed.wait()

    budget.note("determinism: comparing losses and weights")
    losses = {name: {s.step: s.loss for s in parse_step_lines(run.text)}
              for name, run in [("a", a), ("b", b), ("c", c), ("c-resumed", resumed)]}
    c_all = {**losses["c"], **losses["c-resumed"]}

    def differing(x: dict, y: dict) -> list[int]:
        return sorted(s for s in x.keys() & y.keys() if x[s] != y[s])[:10]

    def weights(name: str) -> dict | None:
        path = work / f"det-{name}" / "run" / "checkpoints" / f"step_{plan.det_max:08d}.pt"
        return torch.load(path, map_location="cpu", weights_only=True)["model"] if path.exists() else None

    def same(x: dict | None, y: dict | None) -> bool | None:
        if x is None or y is None:
            return None
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    weights_a = weights("a")
    return {
        "steps": plan.det_max, "status": status,
        "a_steps": len(losses["a"]), "b_steps": len(losses["b"]), "c_steps": len(c_all),
        "ab_differ": differing(losses["a"], losses["b"]),
        "ac_differ": differing(losses["a"], c_all),
        "c_resume_differ": differing(losses["c"], losses["c-resumed"]),
        "c_killed_after_checkpoint": saved and status["c"] == -signal.SIGKILL,
        "c_steps_before_kill": max(losses["c"], default=0),
        "c_resumed_from": min(losses["c-resumed"], default=0),
        "ab_weights_equal": same(weights_a, weights("b")),
        "ac_weights_equal": same(weights_a, weights("c")),
    }


# --- summary ------------------------------------------------------------------------------------------

class Table:
    """The summary's rows, each judged against its target. A smoke run judges only the rows that are not
    `gpu_only` (determinism, pytest): its figures are not GPU figures."""

    def __init__(self, smoke: bool):
        self.smoke, self.rows, self.failed = smoke, [], []

    def row(self, what: str, figure: str, target: str = "", ok: bool | None = None, gpu_only: bool = True) -> None:
        if ok is None:
            verdict = ""
        elif self.smoke and gpu_only:
            verdict = "(smoke: not judged)"
        else:
            verdict = "PASS" if ok else "FAIL"
            if not ok:
                self.failed.append(what)
        self.rows.append(f"| {what} | {figure} | {target} | {verdict} |")

    def no_result(self, what: str, status: int | str, logs: str) -> None:
        """A part that produced nothing: a failure whatever the mode."""
        self.rows.append(f"| {what} | no result ({exited(status)}; see {logs}) | | FAIL |")
        self.failed.append(what)


def exited(status: int | str) -> str:
    return f"exit {status}{', timed out' if status == TIMED_OUT else ''}"


def bench_rows(table: Table, rows: dict[tuple[str, str], BenchRow]) -> None:
    results = {}
    for (size, name), row in rows.items():
        results[size, name] = row.report
        if row.report is None:
            table.no_result(f"bench {size} {name}", row.status, f"bench-{size}-{name}.*")
    for size, limit in [("8x1024", 15.0), ("32x1024", 52.0)]:
        ours, base = results.get((size, "gpt2train")), results.get((size, "compiled"))
        shape = (ours or base or {}).get("shape", size)  # the smoke run's shapes are smaller
        if ours:
            table.row(f"step {shape}, gpt2train (median)", f"{ours['ms_per_step']:.1f} ms ({ours['tokens_per_s']:,.0f} "
                      f"tokens/s, MFU {ours['mfu']:.1%})", f"<= {limit:g} ms", ours["ms_per_step"] <= limit)
        if base:
            table.row(f"step {shape}, compiled (median)", f"{base['ms_per_step']:.1f} ms", "the baseline")
        if ours and base:
            ratio = base["ms_per_step"] / ours["ms_per_step"]
            judged = size == "8x1024"
            table.row(f"step {shape}, gpt2train vs compiled", f"{ratio:.2f}x", ">= 1.3x" if judged else "",
                      ratio >= 1.3 if judged else None)
        if ours and size == "8x1024":
            gb = ours["peak_memory_mb"] * 2**20 / 1e9
            table.row(f"peak memory {shape}, gpt2train", f"{gb:.2f} GB ({ours['peak_memory_mb'] / 1024:.2f} GiB)",
                      "<= 4.5 GB", gb <= 4.5)
    ours = results.get(("8x1024", "gpt2train"))
    det = results.get(("8x1024", "gpt2train-deterministic"))
    if det:
        cost = f", {det['ms_per_step'] - ours['ms_per_step']:+.1f} ms against the default" if ours else ""
        table.row(f"step {det['shape']}, gpt2train --deterministic", f"{det['ms_per_step']:.1f} ms{cost}", "recorded")
    fused = results.get(("8x1024", "gpt2train+fused"))
    if fused:
        gb = fused["peak_memory_mb"] * 2**20 / 1e9
        table.row(f"step {fused['shape']}, gpt2train --fused-loss", f"{fused['ms_per_step']:.1f} ms, peak {gb:.2f} GB",
                  "<= 4.5 GB", gb <= 4.5)
    for lever in ("blocks", "graphs", "autotune"):
        timed = results.get(("8x1024", f"gpt2train+{lever}"))
        if timed:
            base = f", {timed['ms_per_step'] / ours['ms_per_step']:.2f}x the default's time" if ours else ""
            table.row(f"step {timed['shape']}, gpt2train {' '.join(LEVERS[lever])}", f"{timed['ms_per_step']:.1f} ms"
                      f"{base}, peak {timed['peak_memory_mb'] * 2**20 / 1e9:.2f} GB", "recorded")
    muon = results.get(("8x1024", "gpt2train-muon"))
    if muon and ours:
        ratio = muon["ms_per_step"] / ours["ms_per_step"]
        table.row(f"step {muon['shape']}, gpt2train --optimizer muon", f"{muon['ms_per_step']:.1f} ms, {ratio:.2f}x "
                  "AdamW's", "<= 1.15x", ratio <= 1.15)
    for name in ("gpt2train", "compiled", "gpt2train+blocks", "gpt2train+graphs", "gpt2train+autotune"):
        timed = results.get(("8x1024", name))
        if timed and "warmup_s" in timed:
            table.row(f"compile and warm-up {timed['shape']}, {name}", f"{timed['warmup_s']:.1f} s", "recorded")
    eager = results.get(("8x1024", "eager"))
    if eager:
        table.row(f"step {eager['shape']}, eager (median)", f"{eager['ms_per_step']:.1f} ms")


def seconds(figure: float | None) -> str:
    return "-" if figure is None else f"{figure:.1f}"


def target_rows(table: Table, runs: dict[str, TargetRun]) -> None:
    for name, what, limit in TARGET_RUNS:
        run = runs[name]
        if run.target_s is None:
            table.row(f"time to target, {what}", f"target not reached ({exited(run.status)}; see ttt-{name}.log)",
                      f"<= {limit:g} s", False)
            continue
        table.row(f"time to target, {what}", f"{run.target_s:.1f} s to `{TARGET_LINE}` at step "
                  f"{run.last_step or '?'} (header {seconds(run.header_s)} s, first estimate {seconds(run.estimate_s)} s, "
                  f"exit {run.exit_s:.2f} s)", f"<= {limit:g} s", run.target_s <= limit)


def determinism_rows(table: Table, d: dict) -> None:
    n = d["steps"]
    table.row("--deterministic: runs A and B, every loss", f"{d['b_steps']} of {n} steps logged by B, "
              f"{'identical' if not d['ab_differ'] else 'differ at steps ' + str(d['ab_differ'])}", "identical",
              d["a_steps"] == n and d["b_steps"] == n and not d["ab_differ"], gpu_only=False)
    differ = d["ac_differ"] or d["c_resume_differ"]
    table.row("--deterministic: run C killed (SIGKILL) and resumed, every loss",
              f"killed after step {d['c_steps_before_kill']}, resumed from step {d['c_resumed_from']}: "
              f"{'identical to A' if not differ else 'differs at steps ' + str(differ)}", "identical",
              d["c_killed_after_checkpoint"] and d["c_steps"] == n and not differ, gpu_only=False)
    same = {True: "equal", False: "DIFFER", None: "missing"}
    table.row(f"--deterministic: weights at step {n} (last checkpoints)",
              f"A = B: {same[d['ab_weights_equal']]}; A = C: {same[d['ac_weights_equal']]}", "equal",
              d["ab_weights_equal"] is True and d["ac_weights_equal"] is True, gpu_only=False)


def hellaswag_row(plan: Plan, budget: Budget, log: Path, table: Table) -> None:
    budget.note("hellaswag")
    run = Launched([PYTHON, ROOT / "bench" / "hellaswag.py", *plan.hellaswag], cwd=ROOT, log=log / "hellaswag.log",
                   timeout=budget.left(120))
    status = run.wait()
    found = re.search(r"^gpt2train: ([\d.]+) items/s \(([\d.]+) s\)", run.text, re.MULTILINE)
    if status != 0 or found is None:
        table.no_result("HellaSwag scoring", status, "hellaswag.log")
        return
    items = plan.hellaswag[plan.hellaswag.index("--limit") + 1]
    table.row(f"HellaSwag scoring, {items} items", f"{float(found[2]):.1f} s ({found[1]} items/s)",
              f"<= {HELLASWAG_SECONDS:g} s", float(found[2]) <= HELLASWAG_SECONDS)


def pytest_row(table: Table, status: int, output: str) -> None:
    counts = re.findall(r"(\d+ (?:passed|failed|skipped|errors?|deselected|xfailed|xpassed))", output)
    outcome = ", ".join(dict.fromkeys(counts[-6:])) if counts else "no summary"
    table.row("pytest -m gpu", f"{outcome} ({exited(status)})", "all pass",
              status == 0 or (status == 5 and table.smoke), gpu_only=False)  # 5: nothing collected


def summary(env: dict[str, str], table: Table) -> list[str]:
    return [
        f"## bench/gpu.py{' (SMOKE: CPU, tiny model; figures are not GPU figures)' if table.smoke else ''}",
        "",
        f"{env['device']} | torch {env['torch']} | python {env['python']} | {env['date']} | commit {env['commit'][:12]}",
        "",
        "| what | figure | target | result |",
        "| --- | --- | --- | --- |",
        *table.rows,
        "",
        f"FAIL: {'; '.join(table.failed)}" if table.failed else "every judged row passed",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="the directory for the logs and summary.md")
    parser.add_argument("--smoke", action="store_true", help="every part on a CPU, tiny models, GPU figures not judged")
    parser.add_argument("--full", action="store_true", help="the 32 x 1024 rows and the slower levers too")
    parser.add_argument("--budget", type=float,
                        help="seconds for the whole script (default 400; 1200 with --smoke: a shared CPU is slow)")
    args = parser.parse_args(argv)
    budget = Budget(args.budget or (1200 if args.smoke else 400))
    plan = SMOKE if args.smoke else GPU
    if not args.smoke and not torch.cuda.is_available():
        sys.exit(f"no CUDA GPU visible to {PYTHON}: run on a GPU machine, or add --smoke to try the script on a CPU")
    log = args.log.resolve()
    log.mkdir(parents=True, exist_ok=True)
    env = environment(args.smoke)
    (log / "env.txt").write_text("".join(f"{key}: {value}\n" for key, value in env.items()))
    print((log / "env.txt").read_text(), end="", flush=True)
    table = Table(args.smoke)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:  # run directories and compile caches
        work = Path(tmp)
        bench_rows(table, {(size, name): bench(plan, budget, log, work, size, name)
                           for size, name in ROWS + (FULL_ROWS if args.full else [])})
        target_flags = {"cold": plan.target_run, "warm": plan.target_run, "fast": plan.fast_run}
        target_rows(table, {name: time_to_target(budget, log, work, name, target_flags[name])
                            for name, _, _ in TARGET_RUNS})

        # pytest times nothing, so it runs beside the determinism runs, which time nothing either.
        pytest_args = ["-m", "gpu", "-q"]
        if not args.smoke and importlib.util.find_spec("xdist"):
            pytest_args += ["-n", "4"]
        budget.note(f"pytest {' '.join(pytest_args)} (in the background)")
        tests = Launched([PYTHON, "-m", "pytest", *pytest_args], cwd=ROOT, log=log / "pytest.log",
                         timeout=budget.left(360))
        compared = determinism(plan, budget, log, work)
        (log / "det-compare.json").write_text(json.dumps(compared, indent=2) + "\n")
        determinism_rows(table, compared)
        pytest_row(table, tests.wait(), tests.text)
        hellaswag_row(plan, budget, log, table)
    budget.note("summary")
    lines = summary(env, table)
    (log / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())

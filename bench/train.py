"""The standard training benchmark set: gpt2train's step against plain eager PyTorch, time to target,
and decoding with the KV cache. Prints Markdown for BENCHMARKS.md (--json for the raw figures).

    python bench/train.py                    # the CPU set, then the GPU set where CUDA is present
    python bench/train.py --only gpu --steps 50

Sets: on the CPU, the tiny preset and a 4-layer, 256-wide model at batch 8 x 256; on a GPU, GPT-2
124M at the default batch 8 x 1024 and at 32 x 1024. Each variant of a set runs in a process of its
own, one after the other, so that the ratios compare steps timed minutes apart on the same machine.
On a CPU without bf16 matrix instructions bf16 is emulated, about a hundred times slower than
fp32, so the eager-bf16 baseline is timed over fewer steps (--bf16-steps).
Time to target is the wall time from launching `gpt2train train` to its `Target loss achieved` line,
start-up and compilation included: the tiny preset on the CPU, the default run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict

import torch
from common import TARGET_LINE, Launched

from gpt2train.bench import run_in_subprocess
from gpt2train.device import cpu_has_bf16_matmul

CPU = ["--device", "cpu"]
SETS = {
    "cpu": [
        ("tiny preset, batch 8 x 64", [*CPU, "--preset", "tiny"]),
        ("4 layers, 256 wide, batch 8 x 256", [*CPU, "--n-layer", "4", "--n-head", "4", "--n-embd", "256",
                                               "--block-size", "256", "--seq-len", "256", "--batch-size", "8"]),
    ],
    "gpu": [
        ("GPT-2 124M, batch 8 x 1024", ["--device", "cuda"]),
        ("GPT-2 124M, batch 32 x 1024", ["--device", "cuda", "--batch-size", "32"]),
    ],
}
# (label, variant, extra flags): gpt2train's defaults first, then each with compile flipped, then the baselines.
VARIANTS = {
    "cpu": [("gpt2train", "gpt2train", []), ("gpt2train --compile", "gpt2train", ["--compile"]),
            ("eager fp32", "eager-fp32", []), ("eager bf16 autocast", "eager-bf16", [])],
    "gpu": [("gpt2train", "gpt2train", []), ("gpt2train --no-compile", "gpt2train", ["--no-compile"]),
            ("gpt2train --deterministic", "gpt2train-deterministic", []),
            ("compiled (nanoGPT's recipe)", "compiled", []), ("eager", "eager", [])],
}
TARGET_RUNS = {"cpu": [*CPU, "--preset", "tiny"], "gpu": ["--device", "cuda"]}
DECODING = {"cpu": SETS["cpu"][1][1], "gpu": ["--device", "cuda"]}


def gpt2train(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "gpt2train", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"gpt2train {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def time_variant(flags: list[str], variant: str, steps: int, warmup: int) -> dict:
    return asdict(run_in_subprocess([*flags, "--steps", str(steps), "--warmup", str(warmup)], variant))


def time_to_target(flags: list[str]) -> float:
    """Seconds from launch to the `Target loss achieved!` line."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Launched([sys.executable, "-m", "gpt2train", "train", *flags, "--run-dir", f"{tmp}/run",
                        "--out-dir", f"{tmp}/out", "--log-interval", "100"])
        run.wait()
    seconds = run.first(TARGET_LINE)
    if seconds is None:
        sys.exit(f"gpt2train train {' '.join(flags)} ended without reaching its target:\n{run.text}")
    return seconds


def run_set(kind: str, steps: int, warmup: int, bf16_steps: int) -> dict:
    results = {"configs": [], "time_to_target_s": None, "decoding": None}
    for name, flags in SETS[kind]:
        rows = []
        for label, variant, extra in VARIANTS[kind]:
            few = variant == "eager-bf16" and not cpu_has_bf16_matmul()
            n, w = (bf16_steps, 1) if few else (steps, warmup)
            rows.append({"label": label, "steps": n, **time_variant([*flags, *extra], variant, n, w)})
            print(f"  {name}: {label}: {rows[-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
        results["configs"].append({"config": name, "flags": flags, "rows": rows})
    results["time_to_target_s"] = time_to_target(TARGET_RUNS[kind])
    results["decoding"] = gpt2train("bench", *DECODING[kind], "--generate", "200").strip().splitlines()
    return results


def markdown(kind: str, results: dict) -> list[str]:
    lines = []
    for config in results["configs"]:
        rows = config["rows"]
        base = rows[0]
        lines += [f"**{config['config']}** (`gpt2train bench {' '.join(config['flags'])}`)", "",
                  "| variant | dtype | steps timed | ms/step | tokens/s | TFLOP/s | MFU | peak MB | gpt2train's speed-up |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            ratio = "" if r is base else f"{base['tokens_per_s'] / r['tokens_per_s']:.2f}x"
            lines.append(f"| {r['label']} | {r['dtype']} | {r['steps']} | {r['ms_per_step']:.1f} | "
                         f"{r['tokens_per_s']:,.0f} | {r['tflops']:.3f} | {r['mfu']:.1%} | {r['peak_memory_mb']:,.0f} | "
                         f"{ratio} |")
        lines.append("")
    lines.append(f"Time to target ({'tiny preset on the CPU' if kind == 'cpu' else 'the default run'}): "
                 f"{results['time_to_target_s']:.1f} s from launch, start-up included.")
    lines += ["", "Decoding:", "", "```", *results["decoding"], "```", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["cpu", "gpu"], help="run one set (default: cpu, and gpu with CUDA)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--bf16-steps", type=int, default=2, help="timed steps of emulated eager bf16 on a CPU")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    kinds = [args.only] if args.only else ["cpu"] + (["gpu"] if torch.cuda.is_available() else [])
    if "gpu" in kinds and not torch.cuda.is_available():
        sys.exit("--only gpu needs a CUDA GPU")
    results = {kind: run_set(kind, args.steps, args.warmup, args.bf16_steps) for kind in kinds}
    results["torch"] = torch.__version__
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for kind in kinds:
            print("\n".join(markdown(kind, results[kind])))


if __name__ == "__main__":
    main()

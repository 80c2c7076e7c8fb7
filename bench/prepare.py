"""Benchmark `gpt2train prepare` on a generated text corpus: its speed and peak memory, against plain
tiktoken batch encoding of the same text on the same number of cores.

    python bench/prepare.py                 # 500 MB, every core, best of 3
    python bench/prepare.py --mb 100 --workers 2 --repeat 1 --json

The corpus is made offline and deterministically from the built-in corpus: documents of random
paragraphs with their numbers changed, one .txt file per document, in a temporary directory.
The measurements take turns, and each reports its fastest run, so that a neighbour's load on a
shared machine does not decide the comparison. The fixed cost of the command (starting Python,
importing torch, building the tokenizer, exiting) is measured on a one-line input and reported
apart, since it does not grow with the corpus.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpt2train.prepare import default_workers
from gpt2train.tokenizer import get_tokenizer

BASELINE_BATCH_BYTES = 64 << 20  # plain tiktoken is given the text this much at a time


def generate(directory: Path, megabytes: int, seed: int = 0) -> list[Path]:
    """Documents of 2 to 60 KB, 200 to a subdirectory, until `megabytes` of text are written."""
    from pydoc_data.topics import topics

    paragraphs = [p for key in sorted(topics) for p in topics[key].split("\n\n") if p.strip()]
    rng = random.Random(seed)
    files, written = [], 0
    while written < megabytes * 1_000_000:
        target, parts, size = rng.randint(2_000, 60_000), [], 0
        while size < target:
            paragraph = rng.choice(paragraphs).replace("1", str(rng.randint(0, 999)))
            parts.append(paragraph)
            size += len(paragraph) + 2
        path = directory / f"{len(files) // 200:04d}" / f"{len(files):06d}.txt"
        path.parent.mkdir(exist_ok=True)
        written += path.write_bytes("\n\n".join(parts).encode("utf-8"))
        files.append(path)
    return files


def baseline_seconds(files: list[Path], threads: int) -> float:
    """Time spent in tiktoken's encode_ordinary_batch alone (reading the files is not counted)."""
    enc = get_tokenizer()
    spent, batch, size = 0.0, [], 0
    for i, path in enumerate(files):
        batch.append(path.read_text(encoding="utf-8"))
        size += len(batch[-1])
        if size >= BASELINE_BATCH_BYTES or i == len(files) - 1:
            started = time.perf_counter()
            enc.encode_ordinary_batch(batch, num_threads=threads)
            spent += time.perf_counter() - started
            batch, size = [], 0
    return spent


def run_prepare(corpus: Path, out: Path, workers: int) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one `gpt2train prepare` command."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "gpt2train", "prepare", str(corpus), "--out", str(out),
                                "--workers", str(workers), "--quiet", "--overwrite"], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        sys.exit(f"gpt2train prepare failed with exit status {process.returncode}")
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500, help="corpus size in MB (default: 500)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="cores to use (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, the fastest counts (default: 3)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpt2train-bench-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        files = generate(corpus, args.mb)
        megabytes = sum(p.stat().st_size for p in files) / 1e6

        (Path(tmp) / "one-line.txt").write_text("A single line.\n")
        prepare_runs, startup_runs, tiktoken_runs = [], [], []
        # The baseline runs in a process of its own, so that this one stays small: a child's peak
        # memory counts what it inherits from here.
        with multiprocessing.get_context("spawn").Pool(1) as baseline:
            for _ in range(args.repeat):
                startup_runs.append(run_prepare(Path(tmp) / "one-line.txt", Path(tmp) / "one-line", args.workers)[0])
                prepare_runs.append(run_prepare(corpus, Path(tmp) / "data", args.workers))
                tiktoken_runs.append(baseline.apply(baseline_seconds, (files, args.workers)))
        prepare_seconds, tiktoken_seconds = min(seconds for seconds, _ in prepare_runs), min(tiktoken_runs)
        startup_seconds = min(startup_runs)
        peak_rss_mb = max(rss for _, rss in prepare_runs)
        manifest = json.loads((Path(tmp) / "data" / "manifest.json").read_text())
        tokens = sum(manifest["splits"][split]["tokens"] for split in ("train", "val"))

    figures = {
        "corpus_mb": round(megabytes, 1), "documents": len(files), "tokens": tokens, "workers": args.workers,
        "runs": args.repeat,
        "prepare_seconds": round(prepare_seconds, 1), "prepare_mb_per_s": round(megabytes / prepare_seconds, 2),
        "prepare_peak_rss_mb": round(peak_rss_mb), "startup_seconds": round(startup_seconds, 1),
        "tokenizing_mb_per_s": round(megabytes / (prepare_seconds - startup_seconds), 2),
        "tiktoken_seconds": round(tiktoken_seconds, 1), "tiktoken_mb_per_s": round(megabytes / tiktoken_seconds, 2),
        "prepare_vs_tiktoken": round(tiktoken_seconds / prepare_seconds, 3),
        "tokenizing_vs_tiktoken": round(tiktoken_seconds / (prepare_seconds - startup_seconds), 3),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"corpus: {megabytes:,.1f} MB of text in {len(files):,} documents, {tokens:,} tokens; {args.workers} workers; "
          f"fastest of {args.repeat} runs")
    print(f"{'':34s}{'seconds':>9s}{'MB/s':>8s}{'peak RSS':>11s}")
    print(f"{'gpt2train prepare (whole command)':34s}{prepare_seconds:9.1f}{figures['prepare_mb_per_s']:8.2f}"
          f"{peak_rss_mb:8.0f} MB")
    print(f"{'  of which start-up and exit':34s}{startup_seconds:9.1f}")
    print(f"{'  of which reading and tokenizing':34s}{prepare_seconds - startup_seconds:9.1f}"
          f"{figures['tokenizing_mb_per_s']:8.2f}")
    print(f"{'tiktoken encode_ordinary_batch':34s}{tiktoken_seconds:9.1f}{figures['tiktoken_mb_per_s']:8.2f}")
    print(f"prepare runs at {figures['prepare_vs_tiktoken']:.0%} of plain tiktoken's speed, "
          f"{figures['tokenizing_vs_tiktoken']:.0%} once started")


if __name__ == "__main__":
    main()

"""HellaSwag scoring speed: `gpt2train eval --task hellaswag` against lm-evaluation-harness's own `hf` model
on the same model exported to a Hugging Face directory, the same items, in one run; the numbers must agree.

    .venv/bin/python bench/hellaswag.py                          # GPT-2 124M (random weights), 40 items, CPU fp32
    .venv/bin/python bench/hellaswag.py --data hellaswag_val.jsonl --limit 200 --model saved_models/final_model.pt
    .venv/bin/python bench/hellaswag.py --device cuda --dtype bfloat16 --skip-harness --limit 0   # the full set on a GPU

Needs the `eval` and `hf` extras (`bash scripts/install.sh eval,hf`). Without --data the items are made
from the built-in corpus's words in HellaSwag's shape (a context of about 35 words, 4 endings of 10 to 25):
the speed depends on their lengths, not on their sense. Prints items/s for both and the accuracies of both:
gpt2train's with all three figures, and with the harness's two alone (the same work as the harness's).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt2train import hellaswag
from gpt2train.device import resolve_device, resolve_dtype
from gpt2train.final_model import load_model
from gpt2train.hf import export_hf
from gpt2train.model import GPT, GPTConfig

TASK = "hellaswag_bench"
# lm-evaluation-harness's own hellaswag task, reading a local JSON-lines file instead of the Hub.
TASK_YAML = """task: {task}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def synthetic_items(count: int, seed: int = 0) -> list[dict]:
    """HellaSwag-shaped items whose words come from the built-in corpus."""
    from pydoc_data.topics import topics

    words = " ".join(topics.values()).split()
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        n = rng.randint(low, high)
        start = rng.randrange(len(words) - n)
        return " ".join(words[start : start + n])

    items = []
    for i in range(count):
        ctx_a, ctx_b = text(20, 35), text(2, 8)
        items.append(dict(ind=i, activity_label=text(1, 3), ctx_a=ctx_a, ctx_b=ctx_b, ctx=f"{ctx_a} {ctx_b}",
                          endings=[text(10, 25) for _ in range(4)], source_id=str(i), split="val",
                          split_type="indomain", label=rng.randrange(4)))
    return items


def write_local_task(directory: Path, data: Path, name: str) -> None:
    """Task `name` in `directory`, for the harness's --include path: its own hellaswag task (its yaml and
    its utils.py, which cleans the text) over the local HellaSwag file `data`."""
    import lm_eval

    (directory / f"{name}.yaml").write_text(TASK_YAML.format(task=name, data=Path(data).resolve()))
    shutil.copy(Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "utils.py", directory / "utils.py")


def harness_figures(hf_dir: Path, data: Path, work: Path, device: str, dtype: str, batch_size: int) -> tuple[dict, float]:
    """lm-evaluation-harness's `hf` model on hf_dir over the items in `data`: (acc and acc_norm, seconds of
    the evaluation, its reading of the task's data included)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = work / "tasks"
    tasks.mkdir()
    write_local_task(tasks, data, TASK)
    from lm_eval.models.huggingface import HFLM

    # The model is loaded before the clock starts, as gpt2train's is: what is timed is the scoring.
    lm = HFLM(pretrained=str(hf_dir), device=device, dtype=dtype, batch_size=batch_size)
    started = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(tasks)))
    seconds = time.perf_counter() - started
    results = out["results"][TASK]
    return {"acc": results["acc,none"], "acc_norm": results["acc_norm,none"]}, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a gpt2train model (default: GPT-2 124M with random weights, seed 0)")
    parser.add_argument("--data", help="a HellaSwag JSONL file (default: synthetic items)")
    parser.add_argument("--limit", type=int, default=40, help="items to score; 0: all of --data (default: 40)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--harness-batch-size", type=int, default=1, help="the harness's batch size (its default: 1)")
    parser.add_argument("--skip-harness", action="store_true", help="time gpt2train alone")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.model:
        model = load_model(args.model, device=device)
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig()).to(device)
    work = Path(tempfile.mkdtemp(prefix="gpt2train-bench-hellaswag-"))
    try:
        data = work / "items.jsonl"
        if args.data:
            items = hellaswag.read_items(args.data, args.limit)
            lines = Path(args.data).read_text(encoding="utf-8").splitlines()
            data.write_text("\n".join(lines[: len(items)]) + "\n", encoding="utf-8")
        else:
            data.write_text("".join(json.dumps(i) + "\n" for i in synthetic_items(args.limit or 40)), encoding="utf-8")
            items = hellaswag.read_items(data)
        hellaswag.score(model, items[:2], device, dtype)  # warm-up: first-call costs are not the task's
        timed = {}
        for completion in (True, False):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            counts = hellaswag.score(model, items, device, dtype, completion=completion)
            timed[completion] = time.perf_counter() - started, counts.accuracies()
        ours, figures = timed[True]
        print(f"machine: {device} {torch.__version__} | items: {len(items)} | dtype: {dtype}")
        print(f"gpt2train: {len(items) / ours:.2f} items/s ({ours:.1f} s) | acc {figures['acc']:.4f} | acc_norm "
              f"{figures['acc_norm']:.4f} | acc_norm_completion {figures['acc_norm_completion']:.4f}")
        harness_only, _ = timed[False]
        print(f"gpt2train, acc and acc_norm only: {len(items) / harness_only:.2f} items/s ({harness_only:.1f} s)")
        if args.skip_harness:
            return 0
        hf_dir = work / "hf"
        export_hf(model.float().cpu(), hf_dir)
        theirs, seconds = harness_figures(hf_dir, data, work, str(device), args.dtype, args.harness_batch_size)
        print(f"lm-evaluation-harness hf (batch size {args.harness_batch_size}): {len(items) / seconds:.2f} items/s "
              f"({seconds:.1f} s) | acc {theirs['acc']:.4f} | acc_norm {theirs['acc_norm']:.4f}")
        same = all(abs(theirs[k] - figures[k]) < 1e-9 for k in theirs)
        print(f"speed-up: {seconds / harness_only:.2f}x on the same two figures, {seconds / ours:.2f}x with the third "
              f"too | same acc and acc_norm: {'yes' if same else 'NO'}")
        return 0 if same else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

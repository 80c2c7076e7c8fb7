"""Run the examples of the README and its docs pages in order, as a new reader would, in a fresh copy
of this checkout.

    .venv/bin/python bench/readme.py            # about 10 minutes on a 2-core CPU

Every `gpt2train` (and `.venv/bin/...`) command of the bash blocks of README.md, then of each docs page
in the order the README links them, runs in that order, from a copy of the checkout without runs,
models or data, with the TOML files the pages spell out (`# run.toml` blocks) written first. Commands
that need what a reader brings (their own text, a GPU, the network, OpenAI's weights) or hours on a
CPU are skipped, each with its reason. A command passes when it exits as the pages say: 0, or the
status in EXPECTED. Prints one line per command and a summary; exits 1 if any command failed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What a command needs that a fresh checkout on a CPU without network does not have.
SKIP = [
    (r"^gpt2train train$|^\.venv/bin/gpt2train train$|^bash scripts/install\.sh", "the 124M run or a fresh install: hours on a CPU"),
    (r"notes/|books/|corpus/|dump\.jsonl|my_texts|data/mytext|data/notes", "the reader's own text"),
    (r"https?://|hf:", "the network"),
    (r"--task hellaswag|--eval-tasks hellaswag|--lm-eval|--model gpt2-hf|snapshot_download",
     "the network (HellaSwag's validation set, the harness's data sets, OpenAI's weights)"),
    (r"--init-from \./gpt2", "OpenAI's GPT-2 weights"),
    (r"--nproc_per_node=8|--nnodes|/shared/", "GPUs"),
    (r"^gpt2train bench$|--n-layer 4 --n-head 4", "minutes to hours per variant on a CPU"),
    (r"--preset gpt2-fast", "GPT-2 124M, or a 4-layer model's run to its target: hours on a CPU"),
    (r"bench/gpu\.(sh|py)|pip download|pytest", "a GPU (or minutes on a CPU), the network, or the test suite (run by CI)"),
    (r"\.venv/bin/python bench/(train|startup|recipe)\.py", "a benchmark set: many minutes to hours on a CPU"),
    (r"bench/readme\.py", "this script itself"),
]
# Commands the pages say end otherwise than with status 0.
EXPECTED = {r"--max-steps 150\b": 3}  # a pattern of the command -> its status
# What a reader brings for the examples that read it.
READER_FILES = {"prompts.txt": "The dictionary\nA class\n"}


def pages() -> str:
    """README.md, then each docs page in the order the README links it: the order a reader goes in."""
    readme = (ROOT / "README.md").read_text()
    linked = dict.fromkeys(re.findall(r"\]\((docs/[^)#]+\.md)", readme))
    return "\n".join([readme, *((ROOT / page).read_text() for page in linked)])


def commands(readme: str) -> list[tuple[str, str]]:
    """("file", NAME:TEXT) for each `# NAME.toml` block and ("run", COMMAND) for each command, in order."""
    found = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", readme, re.MULTILINE | re.DOTALL):
        if lang == "toml" and (name := re.match(r"# (\S+\.toml)\n", body)):
            found.append(("file", f"{name.group(1)}:{body}"))
        elif lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line.startswith(("gpt2train ", ".venv/bin/", "bash ", "pip ")) or line == "gpt2train train":
                    found.append(("run", re.sub(r"\s+", " ", line)))
    return found


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="gpt2train-readme-"))
    shutil.copytree(ROOT, work, dirs_exist_ok=True, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", ".venv", "runs", "saved_models", "data", "tiny-hf", "gpt2-hf",
                                                  "run.toml", "prompts.txt", "__pycache__", "*.egg-info"))
    (work / ".venv").symlink_to(ROOT / ".venv")
    bin_dir = ROOT / ".venv" / "bin"
    for name, text in READER_FILES.items():
        (work / name).write_text(text)
    failed, ran, skipped = [], 0, 0
    print(f"running the examples of the README and its docs pages in {work}", flush=True)
    for kind, item in commands(pages()):
        if kind == "file":
            name, text = item.split(":", 1)
            (work / name).write_text(text)
            continue
        reason = next((why for pattern, why in SKIP if re.search(pattern, item)), None)
        if reason:
            print(f"skip  {item}  ({reason})", flush=True)
            skipped += 1
            continue
        # Spelled out as .venv/bin/gpt2train first, so that the one replacement makes every such path absolute.
        command = re.sub(r"^gpt2train ", ".venv/bin/gpt2train ", item).replace(".venv/bin/", f"{bin_dir}/")
        started = time.monotonic()
        done = subprocess.run(command, shell=True, cwd=work, capture_output=True, text=True)
        want = next((status for pattern, status in EXPECTED.items() if re.search(pattern, item)), 0)
        ok = done.returncode == want
        ran += 1
        print(f"{'ok   ' if ok else 'FAIL '} {item}  (exit {done.returncode}, {time.monotonic() - started:.0f} s)",
              flush=True)
        if not ok:
            failed.append(item)
            print("      " + (done.stderr.strip() or done.stdout.strip()).splitlines()[-1], flush=True)
    print(f"{ran} run, {skipped} skipped, {len(failed)} failed" + (f": {failed}" if failed else ""))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

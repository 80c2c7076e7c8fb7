"""docs/architecture.md agrees with the code: its module table names every module and no other, and
each of its three questions names the files the code of that question runs through, as a traced run
(scripts/questions.py) measures them, and is followed through at most 6 files."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "architecture.md").read_text()
PACKAGE = ROOT / "src" / "gpt2train"
QUESTIONS = {"one step": "one training step", "a checkpoint": "checkpoint written", "--resume": "`--resume` work"}


def table_rows(heading: str) -> list[str]:
    section = PAGE.split(heading, 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]


def test_the_module_table_names_every_module_and_no_other():
    modules = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    named = {re.match(r"\| `([\w/]+\.py)` \|", row).group(1) for row in table_rows("# Architecture")
             if re.match(r"\| `[\w/]+\.py` \|", row)}
    assert named == modules


@pytest.fixture(scope="module")
def measured():
    """question -> (the files its code passes the question on through, all the files it runs through)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "questions.py")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    found = {}
    for line in done.stdout.splitlines():
        question, passing, answering = re.fullmatch(r"(.+?): \d+ files; passing it on \(\d+\): (.*); "
                                                    r"answering alone \(\d+\): (.*)", line).groups()
        found[question] = (set(passing.split(", ")), set(passing.split(", ")) | set(answering.split(", ")))
    return found


@pytest.mark.parametrize("question", QUESTIONS)
def test_each_question_names_the_files_its_code_runs_through(question, measured):
    row = next(row for row in table_rows("## Three questions") if QUESTIONS[question] in row)
    named = set(re.findall(r"`([\w/]+\.py)`", row))
    passing, every = measured[question]
    assert named <= every, f"named, but not run: {sorted(named - every)}"
    assert passing <= named, f"passes the question on, but not named: {sorted(passing - named)}"


@pytest.mark.parametrize("question", QUESTIONS)
def test_each_question_is_followed_through_at_most_six_files_as_the_page_counts(question, measured):
    passing, every = measured[question]
    assert len(passing) <= 6, sorted(passing)
    row = next(row for row in table_rows("## Three questions") if row.startswith(f"| {question} |"))
    assert row == f"| {question} | {len(passing)} | {len(every)} |"

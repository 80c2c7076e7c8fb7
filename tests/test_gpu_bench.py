"""bench/gpu.py on a CPU: its process handling, the determinism part end to end on the tests' model, and
its judge. The whole script's CPU run is `python bench/gpu.py --smoke LOGDIR` (minutes)."""

import signal
import sys
import time
from pathlib import Path

from helpers import TINY_FLAGS, write_hellaswag

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import gpu  # noqa: E402
from common import TIMED_OUT, Launched  # noqa: E402


def test_a_launched_command_is_stamped_and_stopped_whole_at_its_limit(tmp_path):
    # The child prints, starts a grandchild that holds the output pipe, and sleeps past the limit.
    script = ("import subprocess, sys, time; print('ready', flush=True); "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    started = time.perf_counter()
    run = Launched([sys.executable, "-c", script], log=tmp_path / "log", timeout=3)
    assert run.wait_for("^ready", timeout=30)
    assert run.wait() == TIMED_OUT
    assert time.perf_counter() - started < 20  # the grandchild was stopped with it, not waited for
    assert run.first("ready") < 3 and run.text == "ready\n"
    stamp, line = (tmp_path / "log").read_text().split()
    assert line == "ready" and float(stamp) == round(run.first("ready"), 2)


def test_the_determinism_part_passes_on_the_tests_model(tmp_path, small_corpus):
    plan = gpu.Plan(bench=[], bench_8=[], bench_32=[], target_run=[], fast_run=[],
                    det_run=[*TINY_FLAGS, "--data", str(small_corpus)], det_checkpoint=4, det_max=12, hellaswag=[])
    (tmp_path / "log").mkdir()
    (tmp_path / "work").mkdir()
    compared = gpu.determinism(plan, gpu.Budget(600), tmp_path / "log", tmp_path / "work")
    assert compared["status"] == {"a": 3, "b": 3, "c": -signal.SIGKILL, "c-resumed": 3}  # 3: ran to max steps
    assert compared["c_steps_before_kill"] >= 4 and compared["c_resumed_from"] == 5
    table = gpu.Table(smoke=True)
    gpu.determinism_rows(table, compared)
    assert [row.endswith("| identical | PASS |") or row.endswith("| equal | PASS |") for row in table.rows] == [True] * 3
    assert not table.failed


def test_the_determinism_rows_fail_on_a_differing_loss_even_in_a_smoke_run():
    compared = {"steps": 4, "a_steps": 4, "b_steps": 4, "c_steps": 4, "ab_differ": [3], "ac_differ": [],
                "c_resume_differ": [], "c_killed_after_checkpoint": True, "c_steps_before_kill": 2,
                "c_resumed_from": 3, "ab_weights_equal": True, "ac_weights_equal": None}
    table = gpu.Table(smoke=True)
    gpu.determinism_rows(table, compared)
    assert table.failed == ["--deterministic: runs A and B, every loss",
                            "--deterministic: weights at step 4 (last checkpoints)"]


def figures(ms: float, peak_mb: float = 4000.0) -> dict:
    return {"ms_per_step": ms, "tokens_per_s": 8192 / ms * 1000, "mfu": 0.4, "peak_memory_mb": peak_mb,
            "warmup_s": 20.0, "shape": "8x1024"}


def test_the_speed_rows_are_judged_against_their_targets():
    rows = {("8x1024", "gpt2train"): gpu.BenchRow(0, figures(14.0)),
            ("8x1024", "compiled"): gpu.BenchRow(0, figures(17.0)),  # 1.21x: short of 1.3x
            ("8x1024", "gpt2train+fused"): gpu.BenchRow(0, figures(14.5, peak_mb=3000.0)),
            ("8x1024", "gpt2train-muon"): gpu.BenchRow(0, figures(16.0)),  # 1.14x AdamW's
            ("8x1024", "gpt2train+graphs"): gpu.BenchRow(gpu.TIMED_OUT, None)}
    table = gpu.Table(smoke=False)
    gpu.bench_rows(table, rows)
    assert table.failed == ["bench 8x1024 gpt2train+graphs", "step 8x1024, gpt2train vs compiled"]
    assert any("14.0 ms" in row and row.endswith("| <= 15 ms | PASS |") for row in table.rows)
    assert any("exit 124, timed out" in row for row in table.rows)

    smoke = gpu.Table(smoke=True)  # not GPU figures: nothing judged but what gave no result
    gpu.bench_rows(smoke, rows)
    assert smoke.failed == ["bench 8x1024 gpt2train+graphs"]


def test_a_run_that_missed_its_target_fails_its_row():
    in_time = gpu.TargetRun(0, 30.0, 3.0, 9.0, 28.5, 900)  # within cold's 40 s
    late = gpu.TargetRun(0, 33.0, 3.0, 9.0, 31.5, 900)  # past warm's 30 s
    missed = gpu.TargetRun(gpu.TIMED_OUT, 150.0, 3.0, 9.0, None, 4000)
    table = gpu.Table(smoke=False)
    gpu.target_rows(table, {"cold": in_time, "warm": late, "fast": missed})
    assert table.failed == ["time to target, warm compile cache", "time to target, --preset gpt2-fast, warm cache"]
    assert "target not reached (exit 124, timed out" in table.rows[-1]


def test_the_hellaswag_row_times_the_scoring_of_its_items(tmp_path):
    import torch

    from gpt2train.final_model import save_final_model
    from gpt2train.model import GPT, GPTConfig

    torch.manual_seed(0)
    save_final_model(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)), tmp_path / "model.pt", 1, 1.0)
    flags = ["--model", str(tmp_path / "model.pt"), "--data", str(write_hellaswag(tmp_path / "hs.jsonl")),
             "--device", "cpu", "--limit", "3", "--skip-harness"]
    plan = gpu.Plan(bench=[], bench_8=[], bench_32=[], target_run=[], fast_run=[], det_run=[], det_checkpoint=0,
                    det_max=0, hellaswag=flags)
    table = gpu.Table(smoke=False)
    gpu.hellaswag_row(plan, gpu.Budget(120), tmp_path, table)
    assert table.rows[0].startswith("| HellaSwag scoring, 3 items | ") and table.rows[0].endswith("| <= 20 s | PASS |")

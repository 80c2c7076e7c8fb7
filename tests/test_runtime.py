"""The process's settings: --deterministic's switches, and threads fitted to the free cores."""

import pytest
import torch
from helpers import tiny_config

from gpt2train import runtime, train

CPU = torch.device("cpu")

# Determinism (--deterministic)


@pytest.fixture
def deterministic_state(monkeypatch):
    """Start with every setting --deterministic changes off, and put them all back afterwards."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset-by-the-test")  # records the real value, then:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    saved = (inductor_config.deterministic, torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cuda.cudnn_sdp_enabled())
    torch.use_deterministic_algorithms(False)  # which also turns Inductor's deterministic mode off
    inductor_config.deterministic = False  # (a ConfigModule: monkeypatch cannot restore its attributes)
    try:
        yield inductor_config
    finally:
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        inductor_config.deterministic = saved[0]
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[3], saved[4]
        torch.backends.cuda.enable_cudnn_sdp(saved[5])


def test_deterministic_turns_on_every_setting_it_needs(deterministic_state):
    import os

    runtime.configure_backends(CPU, deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.cudnn_sdp_enabled()  # no deterministic cuDNN attention backward in torch
    assert deterministic_state.deterministic  # Inductor's deterministic mode


def test_deterministic_keeps_a_cublas_workspace_the_user_set(deterministic_state, monkeypatch):
    import os

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    runtime.make_deterministic()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_the_default_stays_the_fastest_path(deterministic_state):
    import os

    assert runtime.configure_backends.__defaults__ == (False,)
    runtime.configure_backends(CPU)
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert not deterministic_state.deterministic


def test_a_run_asked_to_be_deterministic_is(tmp_path, small_corpus, deterministic_state, monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "make_deterministic", lambda: calls.append(None))
    train(tiny_config(tmp_path / "default", small_corpus, max_steps=1, warmup_steps=1, target_loss=0.0),
          log=lambda _: None)
    assert calls == []
    train(tiny_config(tmp_path / "asked", small_corpus, max_steps=1, warmup_steps=1, target_loss=0.0,
                     deterministic=True),
          log=lambda _: None)
    assert calls == [None]


def test_deterministic_may_change_on_resume():
    from gpt2train.config import TrainConfig
    from gpt2train.training.resume import RESUME_LOCKED_KEYS

    assert TrainConfig().deterministic is False
    assert "deterministic" not in RESUME_LOCKED_KEYS


def test_the_bench_variant_times_the_deterministic_path(deterministic_state):
    from gpt2train.bench import run_variant
    from gpt2train.config import resolve_config

    config = resolve_config(overrides=dict(device="cpu", dtype="float32", n_layer=1, n_head=2, n_embd=32,
                                           block_size=16, seq_len=16, batch_size=2))
    result = run_variant(config, "gpt2train-deterministic", 1, 0)
    assert result.variant == "gpt2train-deterministic" and result.ms_per_step > 0
    assert torch.are_deterministic_algorithms_enabled()


def test_two_deterministic_runs_print_the_same_losses(tmp_path, small_corpus):
    from helpers import TINY_FLAGS, logged_losses, run_cli

    outputs = []
    for name in ("a", "b"):
        result = run_cli("train", *TINY_FLAGS, "--deterministic", "--data", small_corpus, "--max-steps", "12",
                         "--target-loss", "0.000001", "--log-interval", "1", "--eval-interval", "0",
                         "--run-dir", tmp_path / name / "run", "--out-dir", tmp_path / name / "out", timeout=300)
        assert result.returncode == 3, result.stderr  # the unreachable target: the run ends at max_steps
        outputs.append(logged_losses(result.stdout))
    assert sorted(outputs[0]) == list(range(1, 13))
    assert outputs[0] == outputs[1]


def test_threads_are_fitted_to_the_cores_other_processes_leave_free(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    busy = iter([10.0, 10.0 + 0.05])  # others kept one core busy over the 0.05 s sampled
    monkeypatch.setattr(runtime, "_cpu_busy_seconds", lambda cores: next(busy))
    monkeypatch.setattr(runtime.time, "process_time", lambda: 0.0)
    monkeypatch.setattr(runtime.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    note = runtime.fit_threads_to_free_cores(sample_seconds=0.05)
    assert chosen == [1]
    assert note.startswith("cpu threads: 1 of 2 (other processes keep 1 core busy")


def test_omp_num_threads_chooses_the_thread_count(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(runtime, "_cpu_busy_seconds", lambda cores: pytest.fail("sampled the load"))
    assert runtime.fit_threads_to_free_cores() is None


def test_a_deterministic_run_keeps_its_thread_count(tmp_path, small_corpus, monkeypatch):
    from gpt2train.training import setup

    calls = []
    monkeypatch.setattr(setup, "fit_threads_to_free_cores", lambda: calls.append(None))
    for name, deterministic in (("default", False), ("deterministic", True)):
        train(tiny_config(tmp_path / name, small_corpus, max_steps=1, warmup_steps=1, target_loss=0.0,
                          deterministic=deterministic), log=lambda _: None)
    assert calls == [None]  # the default run fitted its threads; the deterministic one did not

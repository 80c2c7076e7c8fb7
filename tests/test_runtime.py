"""The automatic choices of device, precision and compilation, with the capabilities they read faked:
the verdict is the same on any CPU or GPU host."""

import pytest
import torch
from helpers import tiny_config

from gpt2train import runtime, train
from gpt2train.errors import UserError
from gpt2train.runtime import cpu_has_bf16_matmul, resolve_device, resolve_dtype, use_compile

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.fixture
def host(monkeypatch):
    """Set what the host has: host(cuda=..., bf16_gpu=..., mps=..., bf16_cpu=...); unset means none."""

    def fake(cuda=False, bf16_gpu=False, mps=False, bf16_cpu=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_gpu)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: bf16_cpu)

    return fake


# Device


@pytest.mark.parametrize("has, expected", [
    (dict(cuda=True, mps=True), "cuda"),
    (dict(cuda=True), "cuda"),
    (dict(mps=True), "mps"),
    ({}, "cpu"),
])
def test_auto_device_picks_cuda_then_mps_then_cpu(host, has, expected):
    host(**has)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device() == torch.device(expected)  # auto is the default


def test_an_explicit_device_is_used_as_given(host):
    host(cuda=True, mps=True)
    assert resolve_device("cpu") == CPU
    assert resolve_device("cuda") == CUDA
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("mps") == MPS


def test_cuda_without_a_cuda_gpu_is_a_user_error(host):
    host(mps=True)
    with pytest.raises(UserError, match="--device cuda was asked for but no CUDA GPU is visible"):
        resolve_device("cuda")
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device("cuda:0")


def test_mps_without_mps_is_a_user_error(host):
    host(cuda=True)
    with pytest.raises(UserError, match="--device mps was asked for but MPS is not available"):
        resolve_device("mps")


def test_an_unknown_device_is_a_user_error(host):
    host()
    with pytest.raises(UserError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


# Precision


@pytest.mark.parametrize("has, device, expected", [
    (dict(cuda=True, bf16_gpu=True), CUDA, torch.bfloat16),
    (dict(cuda=True, bf16_gpu=False), CUDA, torch.float16),  # older GPUs: fp16 with a loss scaler
    (dict(cuda=True, bf16_gpu=True, bf16_cpu=False), CUDA, torch.bfloat16),  # the CPU's instructions do not count
    (dict(mps=True), MPS, torch.float16),
    (dict(mps=True, bf16_cpu=True), MPS, torch.float16),
    (dict(bf16_cpu=True), CPU, torch.bfloat16),  # AMX or AVX-512 BF16
    (dict(bf16_cpu=False), CPU, torch.float32),  # emulated bf16 is slower than fp32
    (dict(cuda=True, bf16_gpu=True, bf16_cpu=False), CPU, torch.float32),  # a GPU does not make the CPU bf16
])
def test_auto_dtype_follows_the_device_and_what_it_supports(host, has, device, expected):
    host(**has)
    assert resolve_dtype("auto", device) == expected


@pytest.mark.parametrize("name, expected", [
    ("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16),
])
@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("capable", [False, True])
def test_an_explicit_dtype_is_used_whatever_the_host_supports(host, name, expected, device, capable):
    host(cuda=True, bf16_gpu=capable, bf16_cpu=capable)
    assert resolve_dtype(name, device) == expected


@pytest.mark.parametrize("name", ["fp32", "bf16", "half", "Float32", ""])
def test_an_unknown_dtype_is_a_user_error(host, name):
    host(bf16_cpu=True)
    with pytest.raises(UserError, match=f"unknown dtype '{name}': use auto, float32, bfloat16, float16"):
        resolve_dtype(name, CPU)


# The CPU's bf16 matrix instructions, as torch reports them


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (False, False, False), (True, False, True), (False, True, True), (True, True, True),
])
def test_cpu_bf16_matmul_is_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert cpu_has_bf16_matmul() is expected
    assert resolve_dtype("auto", CPU) == (torch.bfloat16 if expected else torch.float32)


def test_a_torch_without_the_checks_gets_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert cpu_has_bf16_matmul() is False
    assert resolve_dtype("auto", CPU) == torch.float32


# Compilation


def test_compile_by_default_on_cuda_only():
    assert use_compile(None, CUDA) is True
    assert use_compile(None, torch.device("cuda", 1)) is True
    assert use_compile(None, CPU) is False
    assert use_compile(None, MPS) is False


@pytest.mark.parametrize("device", [CPU, CUDA, MPS])
def test_an_explicit_compile_choice_is_kept(device):
    assert use_compile(True, device) is True
    assert use_compile(False, device) is False


# What a run reports


@pytest.mark.parametrize("bf16_cpu, dtype", [(False, "float32"), (True, "bfloat16")])
def test_the_training_header_reports_what_the_faked_host_chose(tmp_path, small_corpus, host, bf16_cpu, dtype):
    host(bf16_cpu=bf16_cpu)  # no GPU, whatever this host has: auto picks the CPU
    lines = []
    config = tiny_config(tmp_path, small_corpus, device="auto", dtype="auto", max_steps=2, warmup_steps=1,
                         target_loss=0.0)
    result = train(config, log=lines.append)
    assert lines[0].startswith(f"device: cpu | dtype: {dtype} | parameters: ")
    assert result.steps == 2 and result.status == "max_steps"


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

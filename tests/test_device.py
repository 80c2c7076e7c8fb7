"""The automatic choices of device, precision and compilation, with the capabilities they read faked:
the verdict is the same on any CPU or GPU host."""

import pytest
import torch
from helpers import tiny_config

from gpt2train import train
from gpt2train.device import cpu_has_bf16_matmul, resolve_device, resolve_dtype, use_compile
from gpt2train.errors import UserError

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.fixture
def host(monkeypatch):
    """Set what the host has: host(cuda=..., bf16_gpu=..., mps=..., bf16_cpu=...); unset means none."""

    def fake(cuda=False, bf16_gpu=False, mps=False, bf16_cpu=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_gpu)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        monkeypatch.setattr("gpt2train.device.cpu_has_bf16_matmul", lambda: bf16_cpu)

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

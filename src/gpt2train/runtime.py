"""The process a run lives in: device and precision, autocast, backend settings (TF32, deterministic
kernels, the CPU allocator) and seeding."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import random
import sys

import numpy as np
import torch

from .errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(requested: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else must be available."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown device '{requested}': use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available: use --device cpu")
    return device


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The compute precision. 'auto': bf16 on GPUs that support it, else fp16; on a CPU, bf16 where
    it has bf16 matrix instructions (AMX or AVX-512 BF16), else fp32 (emulated bf16 is far slower)."""
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16_matmul() else torch.float32
    if requested not in DTYPES:
        raise UserError(f"unknown dtype '{requested}': use auto, {', '.join(DTYPES)}")
    return DTYPES[requested]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; weights and optimizer state stay fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_has_bf16_matmul() -> bool:
    # torch exposes these checks only under private names; a torch without them gets fp32.
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def use_compile(requested: bool | None, device: torch.device) -> bool:
    """torch.compile the model? None means where it pays: on CUDA GPUs."""
    return device.type == "cuda" if requested is None else requested


def configure_backends(device: torch.device, deterministic: bool = False) -> None:
    """Process settings that make training faster: TF32 for fp32 matrix products on GPUs that
    have it; on a CPU, an allocator that keeps freed memory for the next step. With
    `deterministic`, also the settings that make a run repeat itself exactly (make_deterministic);
    call it before the first matrix product of the process."""
    if deterministic:
        make_deterministic()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 products are deterministic as well
        torch.backends.cudnn.allow_tf32 = True
    elif device.type == "cpu":
        keep_freed_memory_mapped()


CUBLAS_WORKSPACE = ":4096:8"


def make_deterministic() -> None:
    """Deterministic kernels only, process-wide (`--deterministic`): the same seed on the same machine
    and software gives the same losses and weights, at every step and after a resume.

    - cuBLAS picks its reduction order by workspace; a fixed workspace configuration makes it
      repeatable. cuBLAS reads the variable when this process creates its first handle (its first
      matrix product on the GPU), so this must run before that: set-ups that already ran one keep
      their workspace. A value the user exported is kept.
    - `torch.use_deterministic_algorithms(True)` (not warn_only): deterministic kernels where torch
      has both, an error where it has only a non-deterministic one. Per torch's documentation it also
      turns on Inductor's deterministic mode (no benchmarking or autotuning that changes numerics) and,
      for scaled_dot_product_attention, makes the flash backward run its deterministic kernel and the
      memory-efficient backward use a single key split.
    - cuDNN's attention backward has no deterministic path in torch; recent torch skips that backend
      in deterministic mode, and it is turned off here as well so that a torch which would still pick
      it (it is the default on Hopper) falls back to flash attention.
    - cuDNN convolutions (none in GPT-2, but cheap to pin): deterministic algorithms, no benchmarking.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:  # torch versions whose use_deterministic_algorithms does not set Inductor's mode itself
        import torch._inductor.config as inductor_config
    except ImportError:  # pragma: no cover - a torch without Inductor
        return
    if hasattr(inductor_config, "deterministic"):
        inductor_config.deterministic = True


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def keep_freed_memory_mapped() -> None:
    """Stop glibc from returning large freed blocks to the kernel after every step (Linux, CPU).

    A training step allocates and frees the same large tensors (logits alone are batch x seq x
    vocab floats) each time. By default glibc serves those from fresh mmaps and unmaps them on
    free, so every step pays the kernel to fault the pages in and zero them again; on a 2-core
    CPU that was ~40% of the step. Keeping them in the heap makes the next step reuse them.
    """
    if not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):  # musl and other libcs have no mallopt
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)  # large blocks come from the heap, not one mmap each
    libc.mallopt(m_trim_threshold, 2**31 - 1)  # and the heap's free top is not given back

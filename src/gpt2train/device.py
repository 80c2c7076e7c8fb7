"""Where and how a model computes: its device, its precision and autocast, whether it is compiled,
whether a run fits in the device's memory, and models built without an initialisation thrown away."""

from __future__ import annotations

import contextlib
import os

import torch
from torch.overrides import TorchFunctionMode

from .errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# torch.compile's modes (`--compile-mode`): reduce-overhead replays each compiled graph as a CUDA graph.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def cpu_has_bf16_matmul() -> bool:
    # torch exposes these checks only under private names; a torch without them gets fp32.
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; weights and optimizer state stay fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_compile(requested: bool | None, device: torch.device) -> bool:
    """torch.compile the model? None means where it pays: on CUDA GPUs."""
    return device.type == "cuda" if requested is None else requested


# fp32 weights, their gradients and AdamW's two moments: the least a training run holds per parameter.
TRAINING_BYTES_PER_PARAMETER = 16


def check_fits(config, device: torch.device) -> None:
    """Refuse a run that could only end in an allocation failure: one whose weights and optimizer state,
    with one fp32 copy of a micro-batch's logits, exceed the device's memory. (What else the
    activations take shows at the first step.)"""
    parameters = config.model.num_params()
    logits = config.batch_size * config.seq_len * config.model.vocab_size * 4
    needed = parameters * TRAINING_BYTES_PER_PARAMETER + logits
    available = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else _cpu_memory_available()
    if available is not None and needed > available:
        raise UserError(f"training {parameters:,} parameters at batch {config.batch_size} x {config.seq_len} needs at "
                        f"least {needed / 2**30:,.1f} GiB, more than the {available / 2**30:,.1f} GiB available on {device}: "
                        "choose a smaller model, or lower --batch-size or --seq-len")


def _cpu_memory_available() -> int | None:
    """Bytes of memory the system could give this process now (Linux's MemAvailable), else its total."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


class skip_init(TorchFunctionMode):
    """While a model is built under it, its parameters get memory but no values: PyTorch's default
    initialisation is skipped (the caller initialises, once, after). Unlike building on the meta
    device, this costs nothing the first time (meta tensors take a second to warm up)."""

    SKIPPED = {torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.zero_, torch.Tensor.fill_,
               torch.nn.init.kaiming_uniform_, torch.nn.init.uniform_, torch.nn.init.normal_, torch.nn.init.zeros_,
               torch.nn.init.ones_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def start_device(device: torch.device) -> None:
    """Create the device's context now, with a first allocation (on CUDA: a second or more), so that
    its cost shows on its own rather than inside the first step."""
    if device.type == "cuda":
        torch.empty(1, device=device)

"""The process a run lives in: device and precision, autocast, backend settings (TF32, deterministic
kernels, the CPU allocator) and seeding."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from .errors import UserError, one_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_ENV = "GPT2TRAIN_CACHE"
# torch.compile's modes (`--compile-mode`): reduce-overhead replays each compiled graph as a CUDA graph.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def cache_dir() -> Path:
    """Where gpt2train keeps what it can always make again (the built-in corpus's tokens, torch.compile's
    kernels): $GPT2TRAIN_CACHE, else $XDG_CACHE_HOME/gpt2train, else ~/.cache/gpt2train. Deleting it
    loses nothing but time."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2train"


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


def configure_backends(device: torch.device, deterministic: bool = False) -> str | None:
    """Process settings that make training faster: TF32 for fp32 matrix products on GPUs that
    have it; on a CPU, an allocator that keeps freed memory for the next step; torch.compile's
    caches (use_compile_cache). With `deterministic`, also the settings that make a run repeat
    itself exactly (make_deterministic); call it before the first matrix product of the process.
    Returns the line that says the compile cache is not used, if it is not."""
    note = use_compile_cache()
    if deterministic:
        make_deterministic()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 products are deterministic as well
        torch.backends.cudnn.allow_tf32 = True
    elif device.type == "cpu":
        keep_freed_memory_mapped()
    return note


def use_compile_cache() -> str | None:
    """Keep torch.compile's caches in cache_dir()/inductor (unless TORCHINDUCTOR_CACHE_DIR says
    otherwise), so that they outlive a reboot and a second run reuses the first one's compiled code.

    torch creates that directory when torch._dynamo is first imported (every optimizer imports it),
    and the import fails if it cannot: a directory that cannot be written or created (a read-only
    image, a path below a file) is replaced by a temporary one for this process. Returns the line
    that says so."""
    wanted = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(cache_dir() / "inductor")
    try:
        os.makedirs(wanted, exist_ok=True)
        with tempfile.TemporaryFile(dir=wanted):
            pass
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = wanted
        return None
    except OSError as e:
        problem = e.strerror or str(e)
    try:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpt2train-inductor-")
    except OSError as e:
        raise UserError(f"torch needs a writable directory for its compile cache, and neither {wanted} ({problem}) "
                        f"nor the temporary directory ({e.strerror}) is one: set {CACHE_ENV} to a writable "
                        "directory") from None
    return (f"compile cache not used: {wanted} cannot be written ({problem}); this run compiles into "
            f"{os.environ['TORCHINDUCTOR_CACHE_DIR']} (set {CACHE_ENV} to a writable directory to keep the cache)")


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


def fit_threads_to_free_cores(sample_seconds: float = 0.05) -> str | None:
    """On a CPU shared with other busy processes, train on the cores they leave free.

    Every training op waits for all of torch's threads: with one of them sharing a core with another
    busy process, each op waits for that core's time slice, and steps ran 7x slower on a 2-core
    machine. So the cores other processes keep busy over `sample_seconds` (from /proc/stat, less this
    process's own use) are left to them. Skipped when OMP_NUM_THREADS chooses the count. Returns the
    line that says so, if the count was lowered.
    """
    if "OMP_NUM_THREADS" in os.environ or not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    before, ours = _cpu_busy_seconds(cores), time.process_time()
    if before is None:
        return None
    time.sleep(sample_seconds)
    elapsed = sample_seconds
    others = (_cpu_busy_seconds(cores) - before - (time.process_time() - ours)) / elapsed
    busy = round(others)
    threads = max(1, min(torch.get_num_threads(), len(cores) - busy))
    if busy < 1 or threads >= torch.get_num_threads():
        return None
    torch.set_num_threads(threads)
    return (f"cpu threads: {threads} of {len(cores)} (other processes keep {busy} core{'s' if busy > 1 else ''} busy; "
            "set OMP_NUM_THREADS to choose)")


def _cpu_busy_seconds(cores: list[int]) -> float | None:
    """Seconds the given CPUs have spent busy since boot (Linux's /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted, ticks = {f"cpu{i}" for i in cores}, 0
    for line in lines:
        name, *fields = line.split()
        if name in wanted:
            values = [int(v) for v in fields]
            ticks += sum(values[:8]) - values[3] - values[4]  # all but idle and iowait (guest is counted in user)
    return ticks / os.sysconf("SC_CLK_TCK")


def process_age() -> float | None:
    """Seconds since this process started (Linux), or None: the interpreter's start-up and imports
    included, which no timer started in Python sees."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, in clock ticks since boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - started / os.sysconf("SC_CLK_TCK")


class import_in_background:
    """Import `module` on a thread of its own; `join()` before using it.

    A failed import is raised by `join()` as one UserError line, and never tried again on the main
    thread: the submodules it did import stay registered, and a second import of the module would
    fail on them with a misleading error (torch._dynamo's "already registered")."""

    def __init__(self, module: str):
        self.module = module
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._load, daemon=True, name=f"gpt2train-import-{module}")
        self._thread.start()

    def _load(self) -> None:
        try:
            importlib.import_module(self.module)
        except Exception as e:  # noqa: BLE001 - raised by join(), on the thread that uses the module
            self._error = e

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise UserError(f"could not import {self.module} ({type(self._error).__name__}: {one_line(self._error)}): "
                            "check the torch installation, and run with --debug for the traceback") from self._error


def start_device(device: torch.device) -> None:
    """Create the device's context now, with a first allocation (on CUDA: a second or more), so that
    its cost shows on its own rather than inside the first step."""
    if device.type == "cuda":
        torch.empty(1, device=device)


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

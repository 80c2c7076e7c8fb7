"""The process's settings: backends tuned for speed (TF32, the CPU allocator, threads on free cores) or
made to repeat exactly, seeds, the cache directory, and imports started ahead on a thread."""

from __future__ import annotations

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

from .errors import UserError, one_line

CACHE_ENV = "GPT2TRAIN_CACHE"


def cache_dir() -> Path:
    """Where gpt2train keeps what it can always make again (the built-in corpus's tokens, torch.compile's
    kernels): $GPT2TRAIN_CACHE, else $XDG_CACHE_HOME/gpt2train, else ~/.cache/gpt2train. Deleting it
    loses nothing but time."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2train"


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


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

"""`gpt2train bench`: time training steps on synthetic tokens, gpt2train's path against plain PyTorch.

Each variant runs in a process of its own, so that allocator settings, compiled code and memory
peaks of one never leak into another, and the comparison is side by side on the same machine.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import torch

from .config import TrainConfig, to_toml
from .device import autocast, dtype_name, resolve_device, resolve_dtype
from .errors import UserError
from .model import GPT, GPTConfig, KVCache
from .runtime import configure_backends
from .training.optim import build_optimizer
from .training.step import Flags, Pipeline, build_stepper

# Dense bf16 matrix peaks from the datasheets, TFLOP/s, by a name fragment torch reports.
GPU_PEAK_TFLOPS = {
    "H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
    "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0,
}
VARIANTS = {
    "gpt2train": "gpt2train's training step (fused AdamW, on-device skip of bad steps, compile where on, "
                 "TF32 on GPUs, the CPU allocator setting)",
    "gpt2train-deterministic": "gpt2train's training step with --deterministic: deterministic kernels only "
                               "(what reproducibility costs)",
    "gpt2train-muon": "gpt2train's training step with --optimizer muon (what Muon costs per step)",
    "compiled": "the standard compiled recipe (nanoGPT's train.py): the model under torch.compile, fused AdamW, "
                "autocast, clipping, TF32 on GPUs, loss.item() every 10th step",
    "eager": "plain eager PyTorch as written by hand: the same precision, default AdamW, loss.item() every step",
    "eager-fp32": "plain eager PyTorch in fp32",
    "eager-bf16": "plain eager PyTorch with bf16 autocast",
}


@dataclass
class VariantResult:
    variant: str
    dtype: str
    ms_per_step: float  # median over the timed steps
    tokens_per_s: float
    tflops: float  # achieved, from the model's FLOPs per step
    mfu: float  # achieved over the device's peak
    peak_memory_mb: float
    loss: float  # of the last step read, to see that every variant computes the same thing
    warmup_s: float  # the untimed first steps, compilation included


def flops_per_step(model: GPTConfig, batch_size: int, seq_len: int) -> float:
    """Forward and backward FLOPs: 6 per weight per token, plus attention (PaLM's estimate).

    The weights exclude the position table, a lookup; the tied embedding counts once, as the
    output layer's matrix product it is.
    """
    c = model
    weights = c.vocab_size * c.n_embd + c.n_layer * 12 * c.n_embd**2
    attention = 12 * c.n_layer * c.n_embd * seq_len
    return (6 * weights + attention) * batch_size * seq_len


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
                 platform.processor() or "CPU")
    return f"{model}, {torch.get_num_threads()} threads"


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's matrix-multiply peak: the datasheet for known GPUs, measured on a CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAK_TFLOPS.items() if key in name), float("nan"))
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        runs.append(time.perf_counter() - start)
    return 2 * n**3 / min(runs) / 1e12


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_variant(config: TrainConfig, variant: str, steps: int, warmup: int) -> VariantResult:
    """Time `steps` training steps after `warmup` ones, in this process."""
    device = resolve_device(config.device)
    dtype = {"eager-fp32": torch.float32, "eager-bf16": torch.bfloat16}.get(variant) or resolve_dtype(config.dtype, device)
    torch.manual_seed(config.seed)
    model = GPT(config.model).to(device)
    shape = (config.batch_size, config.seq_len)
    x = torch.randint(0, 50257, shape, device=device)
    y = torch.randint(0, 50257, shape, device=device)
    if variant.startswith("gpt2train"):
        # Before the first matrix product: cuBLAS reads its deterministic workspace setting then.
        configure_backends(device, deterministic=config.deterministic or variant == "gpt2train-deterministic")
        if variant == "gpt2train-muon":
            config = replace(config, optimizer="muon")
        step = gpt2train_step(model, dtype, device, config, x, y)
    elif variant == "compiled":
        step = compiled_step(model, dtype, device, config, x, y)
    else:
        step = eager_step(model, dtype, device, config.lr, config.weight_decay, config.grad_clip, x, y)
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - started
    # Host time between steps, as the training loop sees it: once the device's queue is full, that
    # is the device's time per step, and whatever the host does in between is hidden or not.
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    _sync(device)
    seconds = statistics.median(times)
    tflops = flops_per_step(config.model, *shape) / seconds / 1e12
    return VariantResult(
        variant=variant, dtype=dtype_name(dtype), ms_per_step=seconds * 1000,
        tokens_per_s=config.tokens_per_step / seconds, tflops=tflops, mfu=tflops / peak_tflops(device, dtype),
        peak_memory_mb=_peak_memory_mb(device), loss=float(loss), warmup_s=warmup_s,
    )


def gpt2train_step(model: GPT, dtype: torch.dtype, device: torch.device, config: TrainConfig, x: torch.Tensor,
                   y: torch.Tensor):
    """The training loop's own step and pipeline: on a GPU each step is read after the next is queued."""
    pipeline = Pipeline(build_stepper(model, config, device, dtype), lag=1 if device.type == "cuda" else 0)
    steps = itertools.count(1)

    def step() -> float:
        done = None
        while done is None:  # with lag 1 the first push hands back no step yet
            done = pipeline.push(next(steps), [(x, y)], config.lr, Flags())
        return done.result().loss

    return step


def compiled_step(model: GPT, dtype: torch.dtype, device: torch.device, config: TrainConfig, x: torch.Tensor,
                  y: torch.Tensor):
    """The standard compiled recipe as nanoGPT's train.py writes it: the baseline to beat on a GPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    optimizer = build_optimizer(model, config.lr, config.weight_decay)  # fused AdamW, decay on matrices only
    forward = torch.compile(model)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    steps, last_loss = 0, float("nan")

    def step() -> float:
        nonlocal steps, last_loss
        with autocast(device, dtype):
            _, loss = forward(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        if steps % 10 == 0:  # the only host sync, as in nanoGPT's log interval
            last_loss = loss.item()
        return last_loss

    return step


def eager_step(model: GPT, dtype: torch.dtype, device: torch.device, lr: float, weight_decay: float,
               grad_clip: float, x: torch.Tensor, y: torch.Tensor):
    """The training step a user writes by hand: the baseline gpt2train is measured against."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step() -> float:
        with autocast(device, dtype):
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_in_subprocess(argv: list[str], variant: str) -> VariantResult:
    """Run one variant with the same command line in a fresh process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "gpt2train", "bench", *argv, "--variant", variant, "--json"],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"bench variant {variant} failed:\n{done.stderr}")
    return VariantResult(**json.loads(done.stdout)["variants"][0])


def compare_variants(config: TrainConfig, device: torch.device, steps: int, warmup: int, eager: bool = False,
                     deterministic: bool = False, muon: bool = False) -> list[VariantResult]:
    """Time gpt2train's step (and torch.compile's on a GPU), with the variants asked for beside it, each
    in a process of its own; which one is running is said on stderr."""
    variants = ["gpt2train"] + (["compiled"] if device.type == "cuda" else [])
    if deterministic:
        variants.insert(1, "gpt2train-deterministic")
    if muon:
        variants.insert(1, "gpt2train-muon")
    if eager:
        variants += ["eager-fp32", "eager-bf16"] if device.type == "cpu" else ["eager"]
    with tempfile.TemporaryDirectory() as tmp:
        config_file = os.path.join(tmp, "bench.toml")
        with open(config_file, "w") as f:
            f.write(to_toml(config))
        argv = ["--config", config_file, "--steps", str(steps), "--warmup", str(warmup)]
        results = []
        for i, variant in enumerate(variants, 1):
            print(f"bench: timing {variant} ({i} of {len(variants)}, {warmup} warm-up and {steps} timed steps)",
                  file=sys.stderr, flush=True)
            results.append(run_in_subprocess(argv, variant))
    return results


@torch.no_grad()
def time_generation(model: GPT, new_tokens: int, use_cache: bool) -> list[float]:
    """Seconds per new token, token by token, decoding greedily from a one-token prompt."""
    device = next(model.parameters()).device
    cache = KVCache(model.config, 1, device, next(model.parameters()).dtype) if use_cache else None
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    times = []
    for _ in range(new_tokens):
        _sync(device)
        start = time.perf_counter()
        logits, _ = model(ids[:, -1:] if cache is not None and cache.length else ids, cache=cache)
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def generation_report(config: TrainConfig, device: torch.device, new_tokens: int) -> list[str]:
    """Milliseconds per new token early and late in a long generation, with and without the cache."""
    if not 2 <= new_tokens < config.model.block_size:
        raise UserError(f"--generate takes 2 to {config.model.block_size - 1} tokens: the model's context "
                        f"({config.model.block_size}) bounds one uninterrupted KV cache")
    model = GPT(config.model).to(device).eval()
    tenth = max(1, new_tokens // 10)
    lines = [f"decoding {new_tokens} tokens, {config.model.n_layer} layers, {config.model.n_embd} wide, "
             f"context {config.model.block_size}, on {device_name(device)}: ms per new token"]
    for use_cache in (True, False):
        times = time_generation(model, new_tokens, use_cache)
        first, last = statistics.median(times[1 : tenth + 1]), statistics.median(times[-tenth:])
        lines.append(f"{'with KV cache' if use_cache else 'without cache':14s} tokens 2-{tenth + 1}: "
                     f"{first * 1000:7.2f}   last {tenth}: {last * 1000:7.2f}   last/first {last / first:5.2f}")
    return lines


def describe(config: TrainConfig, results: list[VariantResult], device: torch.device) -> list[str]:
    m = config.model
    width = max(12, *(len(r.variant) for r in results))
    lines = [
        f"device: {device_name(device)} | torch {torch.__version__}",
        f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, vocab {m.vocab_size:,} | "
        f"batch {config.batch_size} x {config.seq_len} = {config.tokens_per_step:,} tokens per step",
        f"{'variant':{width}s} {'dtype':9s} {'ms/step':>9s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} "
        f"{'peak MB':>8s} {'loss':>8s} {'warm-up s':>9s}",
    ]
    for r in results:
        lines.append(f"{r.variant:{width}s} {r.dtype:9s} {r.ms_per_step:9.1f} {r.tokens_per_s:10,.0f} {r.tflops:8.3f} "
                     f"{r.mfu:6.1%} {r.peak_memory_mb:8.0f} {r.loss:8.4f} {r.warmup_s:9.1f}")
    base = results[0]
    for other in results[1:]:
        lines.append(f"{base.variant} is {base.tokens_per_s / other.tokens_per_s:.2f}x the tokens/s of {other.variant}")
    return lines


def as_json(config: TrainConfig, results: list[VariantResult], device: torch.device) -> str:
    return json.dumps({
        "device": device_name(device),
        "torch": torch.__version__,
        "model": config.model.to_dict(),
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "tokens_per_step": config.tokens_per_step,
        "flops_per_step": flops_per_step(config.model, config.batch_size, config.seq_len),
        "variants": [asdict(r) for r in results],
    }, indent=2)

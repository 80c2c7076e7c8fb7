import json

import pytest
import torch

from conftest import run_cli
from gpt2train import GPTConfig
from gpt2train.bench import flops_per_step

SMALL = ["--device", "cpu", "--dtype", "float32", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
         "--block-size", "16", "--seq-len", "16", "--batch-size", "2"]


def test_bench_json_has_every_figure_for_each_variant():
    result = run_cli("bench", *SMALL, "--steps", "2", "--warmup", "1", "--compare-eager", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tokens_per_step"] == 32 and report["torch"] == torch.__version__
    assert report["flops_per_step"] == flops_per_step(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16), 2, 16)
    assert [v["variant"] for v in report["variants"]] == ["gpt2train", "eager-fp32", "eager-bf16"]
    for variant in report["variants"]:
        assert {"dtype", "ms_per_step", "tokens_per_s", "tflops", "mfu", "peak_memory_mb", "loss"} <= variant.keys()
        assert variant["ms_per_step"] > 0 and variant["tokens_per_s"] == pytest.approx(32 / variant["ms_per_step"] * 1000)
        assert 0 < variant["mfu"] and variant["peak_memory_mb"] > 0


def test_flops_per_step_is_six_per_weight_per_token_plus_attention():
    gpt2 = GPTConfig()
    weights = 50304 * 768 + 12 * 12 * 768 * 768  # embedding/output matrix, and the blocks' matrices
    assert flops_per_step(gpt2, 8, 1024) == (6 * weights + 12 * 12 * 768 * 1024) * 8 * 1024

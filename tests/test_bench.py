import json

import pytest
import torch
from helpers import run_cli

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


def bench_json(*args) -> dict:
    result = run_cli("bench", *SMALL, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_compiled_variant_has_every_figure_and_trains_as_gpt2train_does():
    # The same model, batch, learning rate and optimizer: after the same steps the same loss, up to the
    # compiled kernels' rounding. compiled_step reads the loss every 10th step: 5 + 5 steps end on one.
    runs = {variant: bench_json("--steps", "5", "--warmup", "5", "--variant", variant)["variants"]
            for variant in ("compiled", "gpt2train")}
    [compiled], [ours] = runs["compiled"], runs["gpt2train"]
    assert compiled["variant"] == "compiled" and compiled["dtype"] == "float32"
    assert {"ms_per_step", "tokens_per_s", "tflops", "mfu", "peak_memory_mb", "loss"} <= compiled.keys()
    assert compiled["ms_per_step"] > 0 and compiled["tokens_per_s"] == pytest.approx(32 / compiled["ms_per_step"] * 1000)
    assert compiled["tflops"] > 0 and compiled["mfu"] > 0 and compiled["peak_memory_mb"] > 0
    assert 5 < compiled["loss"] < 12  # a real loss, read at step 10 (not the NaN of before the first read)
    assert compiled["loss"] == pytest.approx(ours["loss"], rel=1e-3)


def test_compare_deterministic_times_the_deterministic_step_beside_the_default():
    report = bench_json("--steps", "2", "--warmup", "1", "--compare-deterministic")
    variants = report["variants"]
    assert [v["variant"] for v in variants] == ["gpt2train", "gpt2train-deterministic"]  # no compiled on a CPU
    assert all(v["ms_per_step"] > 0 for v in variants)
    assert variants[0]["loss"] == pytest.approx(variants[1]["loss"], rel=1e-5)


def test_compare_muon_times_the_muon_step_beside_the_default():
    report = bench_json("--steps", "1", "--warmup", "1", "--compare-muon")
    assert [v["variant"] for v in report["variants"]] == ["gpt2train", "gpt2train-muon"]
    assert all(v["ms_per_step"] > 0 for v in report["variants"])

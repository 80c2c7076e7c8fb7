"""The final model file: written atomically in fp16, read back safely (`weights_only=True`)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .errors import UserError
from .files import atomic_write
from .model import GPT, GPTConfig
from .tokenizer import TOKENIZER_NAME

FINAL_MODEL_FORMAT = "gpt2train-final-model"
FINAL_MODEL_VERSION = 1


def fp16_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The weights in fp16 on the CPU, with tied tensors kept as one tensor (saved once)."""
    halves: dict[int, torch.Tensor] = {}
    state = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key not in halves:
            halves[key] = tensor.detach().to(device="cpu", dtype=torch.float16)
        state[name] = halves[key]
    return state


def save_final_model(model: GPT, path: str | Path, step: int, best_loss: float) -> None:
    """The seed's final model: {'config': dict, 'model_state_dict': fp16 tensors, ...}."""
    payload = {
        "config": model.config.to_dict(),
        "model_state_dict": fp16_state_dict(model),
        "step": step,
        "best_loss": best_loss,
        "tokenizer": TOKENIZER_NAME,
        "format": FINAL_MODEL_FORMAT,
        "format_version": FINAL_MODEL_VERSION,
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def read_model_file(path: str | Path) -> dict:
    """Load a model file's contents (tensors and plain values only), or explain what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist: train one first or check the path")
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds objects other than tensors and plain values; refusing to load it") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable model file (truncated or corrupt: {str(e).splitlines()[0]})") from None
    if not isinstance(contents, dict) or not {"config", "model_state_dict"} <= contents.keys():
        raise UserError(f"{path} is not a gpt2train model file (no 'config' and 'model_state_dict')")
    return contents


def load_model(path: str | Path = "saved_models/final_model.pt", device: str | torch.device | None = None) -> GPT:
    """The saved model in fp32 and eval mode, on `device` (default: CPU)."""
    contents = read_model_file(path)
    try:
        config = GPTConfig(**contents["config"])
    except TypeError as e:
        raise UserError(f"{path} has an invalid model config: {e}") from None
    model = GPT(config)
    try:
        model.load_state_dict(contents["model_state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path}: the weights do not fit its config ({str(e).splitlines()[0]})") from None
    model = model.float().eval()
    return model.to(device) if device is not None else model

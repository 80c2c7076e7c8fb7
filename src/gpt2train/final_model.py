"""The final model: fp16 weights written when the target is reached, and `load_model` to read them.

Two formats: the seed's `torch.save` dict (`final_model.pt`) and safetensors
(`final_model.safetensors`, optional dependency). Both hold the model config and fp16 weights with
the tied embedding / output matrix stored once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UserError
from .files import atomic_write, load_weights_only
from .model import GPT, GPTConfig
from .tokenizer import TOKENIZER_NAME

FINAL_MODEL_FORMAT = "gpt2train-final-model"
FINAL_MODEL_VERSION = 1
FILE_NAMES = {"pt": "final_model.pt", "safetensors": "final_model.safetensors"}
# In safetensors files the output head is left out: it is the token embedding (tied weights).
TIED_KEY, TIED_SOURCE = "lm_head.weight", "transformer.wte.weight"


def final_model_path(out_dir: str | Path, format: str = "pt") -> Path:
    """Where training writes the final model; fails now if that format cannot be written."""
    if format == "safetensors":
        import_safetensors()
    return Path(out_dir) / FILE_NAMES[format]


def fp16_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights in fp16 on the CPU, with tied tensors kept as one tensor (saved once)."""
    halves: dict[int, torch.Tensor] = {}
    half_state = {}
    for name, tensor in state.items():
        key = tensor.data_ptr()
        if key not in halves:
            halves[key] = tensor.detach().to(device="cpu", dtype=torch.float16)
        half_state[name] = halves[key]
    return half_state


def save_final_model(model: GPT, path: str | Path, step: int, best_loss: float, state: dict | None = None) -> None:
    """Write the model in fp16, atomically, in the format the file name's suffix says.

    `state` is the weights to write when the model's own are sharded over ranks (its gathered
    full state dict); by default, the model's state dict.
    """
    path = Path(path)
    info = {
        "step": step,
        "best_loss": best_loss,
        "tokenizer": TOKENIZER_NAME,
        "format": FINAL_MODEL_FORMAT,
        "format_version": FINAL_MODEL_VERSION,
    }
    state = fp16_state_dict(model.state_dict() if state is None else state)
    if path.suffix == ".safetensors":
        del state[TIED_KEY]
        metadata = {key: json.dumps(value) for key, value in info.items()}
        metadata["config"] = json.dumps(model.config.to_dict())
        data = import_safetensors().torch.save(state, metadata=metadata)
        atomic_write(path, lambda f: f.write(data))
    else:
        # The seed's layout: {'config': dict, 'model_state_dict': tensors}, plus the run's facts.
        payload = {"config": model.config.to_dict(), "model_state_dict": state, **info}
        atomic_write(path, lambda f: torch.save(payload, f))


def read_final_model(path: str | Path) -> dict:
    """{'config': dict, 'model_state_dict': tensors, ...} from either format, or a UserError."""
    path = Path(path)
    if path.suffix == ".safetensors":
        contents = _read_safetensors(path)
    else:
        contents = load_weights_only(path, "model file")
    if not isinstance(contents, dict) or not {"config", "model_state_dict"} <= contents.keys():
        raise UserError(f"{path} is not a gpt2train model file (no 'config' and 'model_state_dict')")
    return contents


def load_model(path: str | Path = "saved_models/final_model.pt", device: str | torch.device | None = None) -> GPT:
    """The saved model in fp32 and eval mode, on `device` (default: CPU).

    `path` is a final model file, or a Hugging Face GPT-2 directory (one with config.json).
    """
    if Path(path).is_dir():
        from .hf import read_hf_model  # imports final_model itself

        config, state = read_hf_model(path)
    else:
        contents = read_final_model(path)
        try:
            config = GPTConfig(**contents["config"])
        except TypeError as e:
            raise UserError(f"{path} has an invalid model config: {e}") from None
        state = contents["model_state_dict"]
    model = GPT(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path}: the weights do not fit its config ({str(e).splitlines()[0]})") from None
    model = model.float().eval()
    return model.to(device) if device is not None else model


def import_safetensors(purpose: str = "the safetensors format", extra: str = "safetensors"):
    """The safetensors package, or a UserError that says how to install it."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError:
        raise UserError(f"{purpose} needs the safetensors package: pip install 'gpt2train[{extra}]'") from None
    return safetensors


def _read_safetensors(path: Path) -> dict:
    safetensors = import_safetensors()
    if not path.is_file():
        raise UserError(f"model file {path} does not exist: check the path")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
        contents = {key: json.loads(value) for key, value in metadata.items()}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable gpt2train safetensors file (truncated or corrupt: {e})") from None
    if "config" not in contents or TIED_SOURCE not in state:
        raise UserError(f"{path} is not a gpt2train model file (no config metadata or token embedding)")
    state[TIED_KEY] = state[TIED_SOURCE]
    contents["model_state_dict"] = state
    return contents

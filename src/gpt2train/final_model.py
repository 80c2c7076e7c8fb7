"""The final model: fp16 weights written when the target is reached, and `load_model` to read them.

Two formats: the seed's `torch.save` dict (`final_model.pt`) and safetensors
(`final_model.safetensors`, optional dependency). Both hold the model config and fp16 weights with
the tied embedding / output matrix stored once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checksum import content_digest, seal_archive
from .errors import UserError
from .files import atomic_write, load_weights_only
from .hf import read_hf_model
from .model import GPT, TIED_WEIGHTS, GPTConfig
from .optional import require_safetensors
from .tokenizer import TOKENIZER_NAME

FINAL_MODEL_FORMAT = "gpt2train-final-model"
# Version 2 adds the checksum and the run that wrote the file; version 1 files are still read.
FINAL_MODEL_VERSION = 2
FILE_NAMES = {"pt": "final_model.pt", "safetensors": "final_model.safetensors"}
# In safetensors files the output head is left out: it is the token embedding (tied weights).
(TIED_KEY, TIED_SOURCE), = TIED_WEIGHTS.items()
DAMAGED_FIX = "restore it from a copy, or train the model again"
CHECKSUM_KEY = "checksum"  # in a safetensors file's metadata


def final_model_path(out_dir: str | Path, format: str = "pt") -> Path:
    """Where training writes the final model; fails now if that format cannot be written."""
    if format == "safetensors":
        require_safetensors()
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


def save_final_model(model: GPT, path: str | Path, step: int, best_loss: float, state: dict | None = None,
                     run: dict | None = None) -> None:
    """Write the model in fp16, atomically, in the format the file name's suffix says, with a checksum.

    `state` is the weights to write when the model's own are sharded over ranks (its gathered
    full state dict); by default, the model's state dict. `run` names the run that wrote it
    ({"id": ..., "dir": ...}).
    """
    path = Path(path)
    info = {
        "step": step,
        "best_loss": best_loss,
        "tokenizer": TOKENIZER_NAME,
        "format": FINAL_MODEL_FORMAT,
        "format_version": FINAL_MODEL_VERSION,
        "run": run or {},
    }
    state = fp16_state_dict(model.state_dict() if state is None else state)
    if path.suffix == ".safetensors":
        del state[TIED_KEY]
        metadata = {key: json.dumps(value) for key, value in info.items()}
        metadata["config"] = json.dumps(model.config.to_dict())
        metadata[CHECKSUM_KEY] = _safetensors_digest(state, metadata)
        data = require_safetensors().torch.save(state, metadata=metadata)
        atomic_write(path, lambda f: f.write(data))
    else:
        # The seed's layout: {'config': dict, 'model_state_dict': tensors}, plus the run's facts.
        payload = {"config": model.config.to_dict(), "model_state_dict": state, **info}
        atomic_write(path, lambda f: (torch.save(payload, f), seal_archive(f)))


def _safetensors_digest(state: dict, metadata: dict) -> str:
    return content_digest({"tensors": state, "metadata": {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}})


def written_by(path: str | Path) -> dict | None:
    """The run record ({"id", "dir"}) of an existing final model, without reading its weights;
    {} for a file that has none (an older gpt2train's, or unreadable); None when there is no file."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        if path.suffix == ".safetensors":
            with require_safetensors().safe_open(path, framework="pt") as f:
                run = json.loads((f.metadata() or {}).get("run", "{}"))
        else:
            run = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("run", {})
    except Exception:  # a damaged file belongs to no run we can name
        return {}
    return run if isinstance(run, dict) else {}


def claim_final_model(path: str | Path, run_id: str, overwrite: bool) -> None:
    """Refuse, before any training, to replace a final model that another run wrote (unless `overwrite`)."""
    owner = written_by(path)
    if owner is None or overwrite or owner.get("id") == run_id:
        return
    who = f"by the run in {owner['dir']}" if owner.get("dir") else "by an older gpt2train or another program"
    raise UserError(
        f"{path} holds a final model written {who}: keep it by choosing another --out-dir, or replace it "
        "with --overwrite"
    )


def read_final_model(path: str | Path) -> dict:
    """{'config': dict, 'model_state_dict': tensors, ...} from either format, or a UserError."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    contents = load_weights_only(path, "model file", damaged_fix=DAMAGED_FIX, sealed_versions=(FINAL_MODEL_VERSION,))
    if not isinstance(contents, dict) or not {"config", "model_state_dict"} <= contents.keys():
        raise UserError(f"{path} is not a gpt2train model file (no 'config' and 'model_state_dict')")
    return contents


def load_model(path: str | Path = "saved_models/final_model.pt", device: str | torch.device | None = None) -> GPT:
    """The saved model in fp32 and eval mode, on `device` (default: CPU).

    `path` is a final model file, or a Hugging Face GPT-2 directory (one with config.json).
    """
    if Path(path).is_dir():
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


def _read_safetensors(path: Path) -> dict:
    safetensors = require_safetensors()
    if not path.is_file():
        raise UserError(f"model file {path} does not exist: check the path")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
        contents = {key: json.loads(value) for key, value in metadata.items() if key != CHECKSUM_KEY}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable gpt2train safetensors file (truncated or corrupt: {e})") from None
    if "config" not in contents or TIED_SOURCE not in state:
        raise UserError(f"{path} is not a gpt2train model file (no config metadata or token embedding)")
    if CHECKSUM_KEY in metadata or contents.get("format_version") == FINAL_MODEL_VERSION:
        if metadata.get(CHECKSUM_KEY) != _safetensors_digest(state, metadata):
            raise UserError(f"{path} is damaged: its contents do not match the checksum it was saved with: "
                            f"{DAMAGED_FIX}")
    state[TIED_KEY] = state[TIED_SOURCE]
    contents["model_state_dict"] = state
    return contents

"""The final model: fp16 weights written when the target is reached, and `load_model` to read them.

Two formats: the default recipe's `torch.save` dict (see config.py) (`final_model.pt`) and safetensors
(`final_model.safetensors`, optional dependency). Both hold the model config and fp16 weights with
the tied embedding / output matrix stored once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINTS, check_checkpoint, find_checkpoint, run_dir_of
from .checksum import content_digest, save_sealed
from .device import skip_init
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
HF_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")  # what a Hugging Face directory holds


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
        atomic_write(path, lambda f: f.write(data), direct=True)
    else:
        # The default recipe's layout: {'config': dict, 'model_state_dict': tensors}, plus the run's facts.
        payload = {"config": model.config.to_dict(), "model_state_dict": state, **info}
        atomic_write(path, lambda f: save_sealed(payload, f), direct=True)


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
    if Path(path).is_dir():
        raise UserError(f"{path} is a directory, where the final model is to be written: move it away, or choose "
                        "another --out-dir")
    owner = written_by(path)
    if owner is None or overwrite or owner.get("id") == run_id:
        return
    who = f"by the run in {owner['dir']}" if owner.get("dir") else "by an older gpt2train or another program"
    raise UserError(
        f"{path} holds a final model written {who}: keep it by choosing another --out-dir, or replace it "
        "with --overwrite"
    )


def read_model(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], dict]:
    """The config, weights and facts ({"step", "best_loss", "run", "tokenizer"}, those known) of any model gpt2train
    reads: a final model (.pt or .safetensors), a training checkpoint, a run directory (its newest
    checkpoint), or a Hugging Face GPT-2 directory. Every failure is one UserError."""
    path = Path(path)
    if path.is_dir() and ((path / CHECKPOINTS).is_dir() or path.name == CHECKPOINTS):
        path = find_checkpoint(str(path), path)
    elif path.is_dir() and any((path / name).exists() for name in HF_FILES):
        config, state = read_hf_model(path)
        return config, state, {}
    elif path.is_dir():
        raise UserError(f"{path} is neither a run directory (no {CHECKPOINTS}/) nor a Hugging Face GPT-2 "
                        "directory (no config.json): give a final model, a checkpoint or one of those")
    contents = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pt(path)
    if contents.get("format") == CHECKPOINT_FORMAT:
        checked = check_checkpoint(contents, path)
        config = {k: v for k, v in checked["config"].items() if k in GPTConfig.__dataclass_fields__}
        run = {"id": checked.get("run_id", ""), "dir": str(run_dir_of(path).resolve())}
        contents = {"config": config, "model_state_dict": checked["model"], "step": checked["step"],
                    "best_loss": checked["best_loss"], "run": run}
    try:
        config = GPTConfig(**contents["config"])
    except TypeError as e:
        raise UserError(f"{path} has an invalid model config: {e}") from None
    facts = {key: contents[key] for key in ("step", "best_loss", "run", "tokenizer") if key in contents}
    return config, contents["model_state_dict"], facts


def _read_pt(path: Path) -> dict:
    contents = load_weights_only(path, "model file", damaged_fix=DAMAGED_FIX, sealed_versions=(FINAL_MODEL_VERSION,))
    if not isinstance(contents, dict) or not (
            {"config", "model_state_dict"} <= contents.keys() or contents.get("format") == CHECKPOINT_FORMAT):
        raise UserError(f"{path} is not a gpt2train model file or checkpoint (no 'config' and 'model_state_dict')")
    return contents


def load_model(path: str | Path = "saved_models/final_model.pt", device: str | torch.device | None = None) -> GPT:
    """The saved model in fp32 and eval mode, on `device` (default: CPU).

    `path` is a final model file, a training checkpoint, a run directory (its newest checkpoint), or a
    Hugging Face GPT-2 directory (one with config.json).
    """
    return _build(path, *read_model(path)[:2], device)


def _build(path, config: GPTConfig, state: dict, device) -> GPT:
    with skip_init():  # the weights are the file's: nothing to initialise first
        model = GPT(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path}: the weights do not fit its config ({str(e).splitlines()[0]})") from None
    model = model.float().eval()
    return model.to(device) if device is not None else model


def export_final_model(source: str | Path, out: str | Path, format: str = "pt", overwrite: bool = False) -> Path:
    """Write any model `read_model` reads as a final model file (`format` pt or safetensors): for a
    checkpoint, the file its run writes at the target. `out` is the file, or a directory to write the
    format's file name in. Refuses to replace a file unless `overwrite`."""
    out = Path(out)
    path = out / FILE_NAMES[format] if out.is_dir() or not out.suffix else out
    if (path.suffix == ".safetensors") != (format == "safetensors"):
        raise UserError(f"--out {out} does not end as a {format} file should: name it "
                        f"{path.with_suffix('.safetensors' if format == 'safetensors' else '.pt').name}")
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists: choose another --out, or replace it with --overwrite")
    final_model_path(path.parent, format)  # the format's package is there
    config, state, facts = read_model(source)
    save_final_model(_build(source, config, state, None), path, step=facts.get("step", 0),
                     best_loss=facts.get("best_loss", math.nan), run=facts.get("run"))
    return path


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

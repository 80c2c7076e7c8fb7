"""GPT-2 weights in the Hugging Face layout, both ways: a GPT exported as a directory that
transformers' GPT2LMHeadModel loads, and such a directory read back as a GPTConfig and weights.

Writing needs only the safetensors package; transformers itself is never imported here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .errors import UserError
from .files import atomic_write_dir, load_weights_only
from .model import GPT, TIED_WEIGHTS, GPTConfig
from .optional import require_safetensors
from .tokenizer import EOT_ID, EOT_TOKEN, GPT2_VOCAB_SIZE, bpe_files

# transformers keeps these four projections in Conv1D modules, whose weight is (in, out): the
# transpose of nn.Linear's (out, in).
CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Causal-mask buffers that older transformers versions saved beside the weights; not parameters.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
PREFIX = "transformer."  # GPT2LMHeadModel's keys have it; GPT2Model's (and OpenAI's gpt2 repo) do not
(OUTPUT_HEAD, TOKEN_EMBEDDING), = TIED_WEIGHTS.items()
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which model.py uses
# The names transformers gives GPT-2's tanh approximation of GELU (model.py's activation).
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
# GPT2Config's defaults, for config.json files that leave a key out.
HF_DEFAULTS = {
    "model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
    "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "add_cross_attention": False,
    "tie_word_embeddings": True,
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _safetensors():
    return require_safetensors("Hugging Face interchange", "hf")


def export_hf(model: GPT, out_dir: str | Path, trim_vocab: bool = False, overwrite: bool = False) -> Path:
    """Write `model` as a Hugging Face GPT-2 directory: weights, config and tokenizer files.

    The weights are fp32, so transformers computes the model's own logits. All vocabulary rows are
    kept (vocab_size 50,304 for gpt2train's padded default) unless `trim_vocab`, which keeps GPT-2's
    50,257 real tokens only, OpenAI's layout. An existing non-empty `out_dir` is replaced only with
    `overwrite`, and only if it holds an earlier model directory.
    """
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    state = hf_state_dict(model, trim_vocab)
    vocab_size = state[TOKEN_EMBEDDING].shape[0]
    vocab_bpe, encoder_json = bpe_files()
    files = {
        "model.safetensors": _safetensors().torch.save(state, metadata={"format": "pt"}),
        "config.json": _json(hf_config(model.config, vocab_size)),
        "generation_config.json": _json(generation_config(vocab_size)),
        # GPT2Tokenizer's files are OpenAI's encoder.json and vocab.bpe under other names.
        "vocab.json": Path(encoder_json).read_bytes(),
        "merges.txt": Path(vocab_bpe).read_bytes(),
        "tokenizer_config.json": _json(tokenizer_config(model.config.block_size)),
        "special_tokens_map.json": _json({"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}),
    }

    def fill(directory: Path) -> None:
        for name, data in files.items():
            (directory / name).write_bytes(data)

    atomic_write_dir(out, fill)
    return out


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: choose a directory to export to")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"{out} is not empty: choose a new or empty directory, or pass --overwrite to replace it")
    if not (out / "config.json").is_file():
        # --overwrite deletes the directory: never one that is not an earlier export.
        raise UserError(f"{out} holds files but no config.json, so --overwrite will not replace it: choose another directory")


def hf_state_dict(model: GPT, trim_vocab: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' GPT-2 names and layouts, fp32 on the CPU."""
    rows = GPT2_VOCAB_SIZE if trim_vocab else model.config.vocab_size
    state = {}
    for name, tensor in model.state_dict().items():
        if name == OUTPUT_HEAD:
            continue  # transformers ties it to the token embedding, as gpt2train does
        tensor = tensor.detach().to(device="cpu", dtype=torch.float32)
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        elif name == TOKEN_EMBEDDING:
            tensor = tensor[:rows]
        state[name] = tensor.contiguous()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is None and name != "lm_head":
            # transformers' GPT-2 always has biases; zeros compute the same as none (--no-bias).
            state[f"{name}.bias"] = torch.zeros(module.weight.shape[0])
    return state


def hf_config(config: GPTConfig, vocab_size: int) -> dict:
    """config.json for GPT2LMHeadModel."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "torch_dtype": "float32",
    }


def generation_config(vocab_size: int) -> dict:
    """generation_config.json: stop at <|endoftext|>, and never emit a padded vocabulary slot.

    gpt2train's own sampling never picks ids beyond GPT-2's 50,257 (no tokenizer can decode them);
    suppress_tokens makes transformers' generate() do the same.
    """
    config = {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID}
    if vocab_size > GPT2_VOCAB_SIZE:
        config["suppress_tokens"] = list(range(GPT2_VOCAB_SIZE, vocab_size))
    return config


def tokenizer_config(block_size: int) -> dict:
    """tokenizer_config.json for GPT2Tokenizer, as OpenAI's gpt2 repository has it."""
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": block_size,
        "bos_token": EOT_TOKEN,
        "eos_token": EOT_TOKEN,
        "unk_token": EOT_TOKEN,
        "add_prefix_space": False,
        "add_bos_token": False,
        "errors": "replace",
        # Decoding gives back the exact text, as tiktoken's does.
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(EOT_ID): {"content": EOT_TOKEN, "lstrip": False, "normalized": True, "rstrip": False,
                          "single_word": False, "special": True},
        },
    }


def _json(value: dict) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def read_hf_config(directory: str | Path) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT-2 directory; a UserError if gpt2train cannot represent it."""
    return _gpt_config(_read_config_json(Path(directory)))


def _read_config_json(directory: Path) -> dict:
    """config.json with GPT2Config's defaults filled in, checked to be a model gpt2train can compute."""
    path = directory / "config.json"
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory: give a Hugging Face GPT-2 model directory")
    if not path.is_file():
        raise UserError(f"{directory} has no config.json, so it is not a Hugging Face model directory: check the path")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): it must be a transformers config.json") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} is not a transformers config (not a JSON object)")
    hf = {**HF_DEFAULTS, **values}
    problem = _unsupported(hf)
    if problem:
        raise UserError(f"{directory} holds a model gpt2train cannot represent ({problem}); only GPT-2's own architecture loads")
    return hf


def _gpt_config(hf: dict) -> GPTConfig:
    # Dropout stays at its default: it is a training setting, not part of the weights.
    return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True)


def _unsupported(hf: dict) -> str:
    """What in a config.json model.py cannot compute, or ''."""
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        if not isinstance(hf[key], int) or isinstance(hf[key], bool) or hf[key] <= 0:
            return f"{key} is {hf[key]!r}, not a positive integer"
    checks = [
        (hf["model_type"] == "gpt2", f"model_type is {hf['model_type']!r}, not 'gpt2'"),
        (hf["activation_function"] in TANH_GELU, f"activation_function is {hf['activation_function']!r}, not gelu_new"),
        (hf["layer_norm_epsilon"] == LAYER_NORM_EPS, f"layer_norm_epsilon is {hf['layer_norm_epsilon']}, not 1e-05"),
        (hf["n_inner"] in (None, 4 * hf["n_embd"]), f"n_inner is {hf['n_inner']}, not 4 * n_embd"),
        (hf["n_embd"] % hf["n_head"] == 0, f"n_embd {hf['n_embd']} is not a multiple of n_head {hf['n_head']}"),
        (hf["vocab_size"] >= GPT2_VOCAB_SIZE, f"vocab_size {hf['vocab_size']} is below GPT-2's {GPT2_VOCAB_SIZE}"),
        (hf["scale_attn_weights"], "scale_attn_weights is off"),
        (not hf["scale_attn_by_inverse_layer_idx"], "scale_attn_by_inverse_layer_idx is on"),
        (not hf["reorder_and_upcast_attn"], "reorder_and_upcast_attn is on"),
        (not hf["add_cross_attention"], "add_cross_attention is on"),
    ]
    return next((message for ok, message in checks if not ok), "")


def read_hf_model(directory: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The GPTConfig and the gpt2train state dict of a Hugging Face GPT-2 directory.

    Reads model.safetensors or pytorch_model.bin, with or without the `transformer.` key prefix.
    """
    directory = Path(directory)
    hf = _read_config_json(directory)
    config = _gpt_config(hf)
    weights = {key.removeprefix(PREFIX): tensor for key, tensor in _read_weights(directory).items()
               if not key.endswith(MASK_BUFFERS)}
    head = weights.pop(OUTPUT_HEAD, None)
    with torch.device("meta"):  # the names and shapes gpt2train expects, without allocating them
        expected = GPT(config).state_dict()
    state = {}
    for name, like in expected.items():
        if name == OUTPUT_HEAD:
            continue
        tensor = weights.pop(name.removeprefix(PREFIX), None)
        if tensor is None:
            raise UserError(f"{directory} has no weight {name.removeprefix(PREFIX)}: it is not a complete GPT-2 model")
        if name.endswith(CONV1D_WEIGHTS) and tensor.dim() == 2:
            tensor = tensor.t()
        if tensor.shape != like.shape:
            raise UserError(f"{directory}: {name} has shape {tuple(tensor.shape)}, but its config.json needs "
                            f"{tuple(like.shape)}: the weights do not match the config")
        state[name] = tensor
    if weights:
        raise UserError(f"{directory} has weights GPT-2 does not ({', '.join(sorted(weights)[:3])}): "
                        "only plain GPT2LMHeadModel or GPT2Model weights load")
    if not hf["tie_word_embeddings"]:  # when tied, transformers too ignores a stored head
        _check_head(directory, head, state[TOKEN_EMBEDDING])
    state[OUTPUT_HEAD] = state[TOKEN_EMBEDDING]
    return config, state


def _check_head(directory: Path, head: torch.Tensor | None, embedding: torch.Tensor) -> None:
    """gpt2train's output head is the token embedding: refuse a model whose own head differs."""
    if head is None or head.shape != embedding.shape or not torch.equal(head, embedding):
        raise UserError(f"{directory} has an output head (lm_head.weight) that is not its token embedding; "
                        "gpt2train ties the two, so it cannot represent this model")


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = next((directory / name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    if path is None:
        raise UserError(f"{directory} has no {' or '.join(WEIGHT_FILES)} (sharded weights are not supported): "
                        "save the model as one file")
    if path.suffix == ".safetensors":
        safetensors = _safetensors()
        try:
            weights = safetensors.torch.load_file(path)
        except (safetensors.SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable safetensors file (truncated or corrupt: {e})") from None
    else:
        weights = load_weights_only(path, "weights file")
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise UserError(f"{path} is not a state dict of tensors: it is not a Hugging Face weights file")
    return weights

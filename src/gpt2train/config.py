"""Training configuration: the typed defaults (the default recipe), presets, TOML files, overrides.

Precedence, lowest first: the preset, the config file, then command-line flags.

The default recipe is the run gpt2train was first built to do, which its defaults still are: GPT-2
124M, batches of 8 x 1024 tokens, AdamW at a peak learning rate of 6e-4 on a cosine schedule, until
a step's training loss falls below 0.099999; then an fp16 final model in a `torch.save` dict
(`final_model.pt`) that a short loading snippet reads back, and three closing lines.
"""

from __future__ import annotations

import json
import math
import sys
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .data import SAMPLERS
from .device import COMPILE_MODES, DTYPES
from .errors import UserError
from .final_model import FILE_NAMES
from .hf import read_hf_config
from .model import GPTConfig
from .tokenizer import GPT2_VOCAB_SIZE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


OPTIMIZERS = ("adamw", "muon")
EVAL_TASKS = ("hellaswag",)
SCHEDULES = ("cosine", "wsd")


def _opt(default, help: str, group: str, choices: tuple = ()):
    """A config field with its --help text, the --help section it is listed in, and the values it may take
    (if only some): the command line and `validate` both read them from here."""
    return field(default=default, metadata={"help": help, "group": group, "choices": tuple(choices)})


PRESETS: dict[str, dict] = {
    # The default recipe: GPT-2 124M, batch 8 x 1024.
    "gpt2": {},
    # The larger GPT-2 shapes, with the peak learning rates GPT-3's paper used at these sizes.
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, lr=3e-4, min_lr=3e-5),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, lr=2.5e-4, min_lr=2.5e-5),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, lr=2e-4, min_lr=2e-5),
    # GPT-2 124M with the recipe that reached the default target loss in the fewest steps on the CPU proxy
    # (bench/recipe.py): Muon on the blocks' matrices, AdamW at a higher lr on the rest, a short
    # warmup, then constant until the loss is within 8x the target, then a 300-step linear decay.
    "gpt2-fast": dict(
        optimizer="muon", muon_lr=0.01, lr=5e-3, min_lr=5e-4, warmup_steps=50, schedule="wsd", decay_at=8.0,
        max_steps=4000, decay_fraction=0.075,
    ),
    # A few million parameters that memorise a 1K-token slice of the built-in corpus to the
    # default target loss on a 2-core CPU in a few minutes. The 50,304-wide output layer is most
    # of the cost at this size, so the model is narrow and the steps are short.
    "tiny": dict(
        n_layer=2, n_head=4, n_embd=128, block_size=64,
        seq_len=64, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=20, max_steps=1500,
        train_tokens=1024,
    ),
}


RUN, DATA, OPTIMIZATION, CHECKPOINTS = "run", "data and output", "optimization", "logging and checkpoints"


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model shape (which lives in `model`)."""

    model: GPTConfig = field(default_factory=GPTConfig)
    preset: str = _opt("gpt2", "named configuration to start from (see `gpt2train presets`)", RUN, PRESETS)
    device: str = _opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", RUN)
    dtype: str = _opt("auto", "auto (bf16 on GPUs that have it, else fp16; on a CPU bf16 with AMX or AVX-512 BF16, "
                                 "else fp32), float32, bfloat16, float16", RUN, ("auto", *DTYPES))
    seed: int = _opt(1337, "random seed for weights and data order", RUN)
    compile: bool | None = _opt(None, "torch.compile the model for training (default: on CUDA GPUs only)", RUN)
    deterministic: bool = _opt(False, "deterministic kernels only: two runs with the same seed on the same machine "
                               "and software give the same losses and weights, at some cost in speed", RUN)
    compile_mode: str = _opt("default", "torch.compile's mode: default; reduce-overhead (each compiled graph replayed "
                             "as a CUDA graph, fewer kernel launches); max-autotune or max-autotune-no-cudagraphs "
                             "(kernels tuned at compile time, minutes more of it)", RUN, COMPILE_MODES)
    compile_blocks: bool = _opt(False, "with compile, compile each transformer block on its own (all share one "
                                "compiled graph) instead of the whole model, to compile in less time; the "
                                "embeddings and the output layer run uncompiled", RUN)
    fused_loss: bool = _opt(False, "compute the output layer and the loss together, 1,024 positions at a time, never "
                            "holding the whole batch's logits: the same loss in less memory", RUN)
    fsdp: bool = _opt(False, "under torchrun, shard weights, gradients and optimizer state over the ranks (FSDP2) "
                      "instead of replicating them (DDP)", RUN)
    init_from: str = _opt("", "start from the GPT-2 weights in this Hugging Face model directory, whose config.json "
                              "sets the model's shape; empty: random weights", RUN)
    data: str = _opt("", "directory written by `gpt2train prepare`; empty: the built-in corpus", DATA)
    train_tokens: int = _opt(0, "train on the first N tokens of the training split only; 0: all", DATA)
    sampling: str = _opt("random", "how training windows are drawn: random (anywhere, the default recipe's) or sequential "
                         "(every token once per epoch, in a shuffled order)", DATA, SAMPLERS)
    out_dir: str = _opt("saved_models", "where the final model is written", DATA)
    format: str = _opt("pt", "final model file format: pt (torch.save, the default recipe's) or safetensors", DATA, FILE_NAMES)
    batch_size: int = _opt(8, "sequences per micro-step on each rank", OPTIMIZATION)
    grad_accum: int = _opt(1, "micro-steps whose gradients add up to one optimizer step", OPTIMIZATION)
    seq_len: int = _opt(1024, "tokens per sequence (at most block_size)", OPTIMIZATION)
    max_steps: int = _opt(20000, "stop after this many optimizer steps", OPTIMIZATION)
    warmup_steps: int = _opt(2000, "linear warmup steps before the decay", OPTIMIZATION)
    optimizer: str = _opt("adamw", "adamw (the default recipe's), or muon: Muon on the transformer blocks' matrices and AdamW on "
                          "the embeddings, biases and LayerNorm gains", OPTIMIZATION, OPTIMIZERS)
    lr: float = _opt(6e-4, "peak learning rate (of AdamW, for every parameter it updates)", OPTIMIZATION)
    min_lr: float = _opt(6e-5, "learning rate at the end of the decay", OPTIMIZATION)
    weight_decay: float = _opt(0.1, "AdamW weight decay on matrices and embeddings", OPTIMIZATION)
    muon_lr: float = _opt(0.01, "with --optimizer muon, Muon's peak learning rate (the schedule scales it as it "
                          "scales --lr)", OPTIMIZATION)
    muon_momentum: float = _opt(0.95, "with --optimizer muon, Muon's (Nesterov) momentum", OPTIMIZATION)
    muon_weight_decay: float = _opt(0.1, "with --optimizer muon, Muon's weight decay", OPTIMIZATION)
    schedule: str = _opt("cosine", "learning-rate schedule after the warmup: cosine (down to min_lr at max_steps, the "
                         "default recipe's) or wsd (constant, then a linear decay to min_lr over the last decay_fraction of "
                         "max_steps)", OPTIMIZATION, SCHEDULES)
    decay_fraction: float = _opt(0.2, "with --schedule wsd, the share of max_steps the decay takes", OPTIMIZATION)
    decay_at: float = _opt(0.0, "with --schedule wsd, start the decay early, once a step's training loss first falls "
                           "below decay_at x target_loss; 0: only at the end", OPTIMIZATION)
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this; 0: off", OPTIMIZATION)
    target_loss: float = _opt(0.099999, "stop and save the final model at the first step whose training loss is below this", OPTIMIZATION)
    log_interval: int = _opt(10, "print a log line every N steps", CHECKPOINTS)
    eval_interval: int = _opt(500, "steps between validation-loss evaluations; 0: never", CHECKPOINTS)
    eval_tokens: int = _opt(262144, "validation tokens per evaluation; 0: the whole split", CHECKPOINTS)
    eval_tasks: str = _opt("", "benchmark tasks to score the model on during training, comma-separated: hellaswag; "
                           "empty: none", CHECKPOINTS)
    task_eval_interval: int = _opt(250, "with --eval-tasks, steps between task evaluations", CHECKPOINTS)
    task_eval_limit: int = _opt(0, "with --eval-tasks, score the first N items of each task; 0: all", CHECKPOINTS)
    task_eval_data: str = _opt("", "with --eval-tasks hellaswag, a local copy of hellaswag_val.jsonl; empty: the copy "
                               "in the gpt2train cache, downloaded on first use", CHECKPOINTS)
    target_metric: str = _opt("train", "which loss the target applies to: train (each step's) or val (at evaluations)",
                              CHECKPOINTS, ("train", "val"))
    tensorboard: bool = _opt(False, "also write TensorBoard events to run_dir/tensorboard (needs the tensorboard package)", CHECKPOINTS)
    wandb: bool = _opt(False, "also log to Weights & Biases (needs the wandb package and a wandb login)", CHECKPOINTS)
    wandb_project: str = _opt("gpt2train", "the Weights & Biases project to log to", CHECKPOINTS)
    run_dir: str = _opt("", "where checkpoints go; empty: runs/<preset>", CHECKPOINTS)
    checkpoint_interval: int = _opt(0, "steps between checkpoints; 0: about every 10 minutes of training", CHECKPOINTS)
    keep_checkpoints: int = _opt(2, "how many of the newest checkpoints to keep", CHECKPOINTS)
    resume: str = _opt("", "continue a run: 'latest' (the newest checkpoint in run_dir), a checkpoint file or a run directory", CHECKPOINTS)
    overwrite: bool = _opt(False, "start a new run where an earlier run left its files: delete the checkpoints in "
                           "run_dir, and let this run's final model replace another run's in out_dir", CHECKPOINTS)
    max_bad_steps: int = _opt(10, "stop after this many steps in a row with a non-finite loss or gradient", CHECKPOINTS)
    # The settings given explicitly (config file and overrides, not the preset's): what a resumed
    # run applies on top of its checkpoint's config.
    chosen: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.run_dir:
            self.run_dir = f"runs/{self.preset}"

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step on one rank; the global batch is this times the world size."""
        return self.batch_size * self.seq_len * self.grad_accum

    @property
    def tasks(self) -> list[str]:
        """The benchmark tasks --eval-tasks names, in order."""
        return [task.strip() for task in self.eval_tasks.split(",") if task.strip()]

    def to_flat_dict(self) -> dict:
        """One level of keys, as in a config file: model fields beside the run fields."""
        flat = {k: v for k, v in asdict(self).items() if k not in ("model", "chosen")}
        flat.update(self.model.to_dict())
        return flat


MODEL_FIELDS = {f.name: f for f in fields(GPTConfig)}
RUN_FIELDS = {f.name: f for f in fields(TrainConfig) if f.name not in ("model", "chosen")}
# Keys that say how to start a run rather than what the run is: never saved or compared.
ONE_OFF_KEYS = ("resume", "overwrite")
MODEL_HELP = {
    "block_size": "longest context the model can see (size of the position table)",
    "vocab_size": "output vocabulary; at least GPT-2's 50,257, padded for speed",
    "n_layer": "transformer blocks",
    "n_head": "attention heads per block",
    "n_embd": "embedding width",
    "dropout": "dropout probability (0 for pre-training)",
    "bias": "biases in Linear layers and LayerNorms",
}

def field_types() -> dict[str, type]:
    """The Python type of every flat config key."""
    model, run = typing.get_type_hints(GPTConfig), typing.get_type_hints(TrainConfig)
    return {**{name: model[name] for name in MODEL_FIELDS}, **{name: run[name] for name in RUN_FIELDS}}


def base_type(annotation) -> type:
    """`bool` for `bool | None`: the type a setting takes when it is set."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _check_type(key: str, value, expected: type, source: str):
    expected = base_type(expected)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise UserError(f"{source}: '{key}' must be {expected.__name__}, got {value!r}")
    return value


def _check_keys(values: dict, source: str) -> dict:
    types = field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise UserError(
            f"{source}: unknown key '{unknown[0]}'; valid keys are the long flag names with "
            f"underscores (see `gpt2train train --help`)"
        )
    return {k: _check_type(k, v, types[k], source) for k, v in values.items()}


def to_toml(config: TrainConfig) -> str:
    """The config as a flat TOML file that `--config` reads back (without the one-off resume/overwrite)."""
    lines = []
    for key, value in config.to_flat_dict().items():
        if key in ONE_OFF_KEYS or value is None:  # TOML has no null: unset means the default
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value)  # a JSON string is a valid TOML basic string
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def load_toml(path: str | Path) -> dict:
    """A flat TOML table of config keys, checked for unknown keys and wrong types."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist: check the --config path") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML ({e}): fix the syntax") from None
    except UnicodeDecodeError as e:  # tomllib decodes the bytes itself, and TOML is UTF-8 only
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}): "
                        "save it as UTF-8") from None
    return _check_keys(values, f"config file {path}")


def resolve_config(
    config_file: str | Path | None = None, overrides: dict | None = None, base: dict | None = None
) -> TrainConfig:
    """Preset, then config file, then overrides; validated.

    `base` replaces the preset: a resumed run starts from the flat config saved in its checkpoint,
    so only what the user sets now changes it.
    """
    file_values = load_toml(config_file) if config_file else {}
    overrides = _check_keys({k: v for k, v in (overrides or {}).items() if v is not None}, "option")
    chosen = {**file_values, **overrides}
    if base is not None:
        values = {**base, **chosen}
    else:
        preset = chosen.get("preset", "gpt2")
        if preset not in PRESETS:
            raise UserError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
        preset_values = dict(PRESETS[preset])
        if chosen.get("data"):
            # A preset's slice of the built-in corpus never shrinks the user's own data.
            preset_values.pop("train_tokens", None)
        values = {**preset_values, **chosen, "preset": preset}
        if values.get("init_from"):
            values.update(_shape_of(values["init_from"], chosen))
    model = GPTConfig(**{k: v for k, v in values.items() if k in MODEL_FIELDS})
    config = TrainConfig(model=model, chosen=chosen, **{k: v for k, v in values.items() if k in RUN_FIELDS})
    validate(config)
    # A warmup longer than the run is a contradiction only when both were chosen; a short test
    # run with the preset's warmup (--max-steps 1) simply ends inside the warmup.
    if "warmup_steps" in chosen and config.warmup_steps > config.max_steps:
        raise UserError(
            f"invalid configuration: warmup_steps ({config.warmup_steps}) must not exceed max_steps "
            f"({config.max_steps}): lower --warmup-steps or raise --max-steps"
        )
    return config


def _shape_of(init_from: str, chosen: dict) -> dict:
    """The model shape of the Hugging Face directory a run starts from; what the user chose must agree."""
    shape = read_hf_config(init_from).to_dict()
    del shape["dropout"]  # a training setting: the run's own
    for key, value in shape.items():
        if key in chosen and chosen[key] != value:
            raise UserError(
                f"{key}={chosen[key]!r} disagrees with {init_from}, whose model has {key}={value!r}: drop that "
                f"setting, since --init-from sets the model's shape"
            )
    return shape


def preset_config(name: str) -> TrainConfig:
    return resolve_config(overrides={"preset": name})


def preset_lines() -> list[str]:
    """`gpt2train presets`: each named configuration, its size and what it changes."""
    lines = []
    for name, values in PRESETS.items():
        params = preset_config(name).model.num_params()
        changes = ", ".join(f"{k}={v}" for k, v in values.items()) or "the default recipe"
        lines.append(f"{name:12s} {params / 1e6:9.2f}M parameters  {changes}")
    return lines


def validate(config: TrainConfig) -> None:
    """Reject settings that cannot train, each with the fix."""
    m = config.model
    floats = {name: getattr(config, name) for name in ("lr", "min_lr", "weight_decay", "grad_clip", "target_loss",
                                                       "muon_lr", "muon_momentum", "muon_weight_decay", "decay_fraction",
                                                       "decay_at")}
    checks = [
        *((math.isfinite(value), f"{name} must be a finite number, not {value}") for name, value in floats.items()),
        (0 <= config.seed < 2**32, f"seed must be in [0, 2**32), not {config.seed}"),
        (config.target_loss >= 0, "target_loss must not be negative (0: no target, train to max_steps)"),
        (m.n_layer > 0, "n_layer must be positive"),
        (m.n_head > 0, "n_head must be positive"),
        (m.n_embd > 0 and m.n_embd % max(m.n_head, 1) == 0, f"n_embd ({m.n_embd}) must be a positive multiple of n_head ({m.n_head})"),
        (m.block_size > 0, "block_size must be positive"),
        (m.vocab_size >= GPT2_VOCAB_SIZE, f"vocab_size must be at least {GPT2_VOCAB_SIZE} (the GPT-2 tokenizer's size)"),
        (0.0 <= m.dropout < 1.0, "dropout must be in [0, 1)"),
        (config.batch_size > 0, "batch_size must be positive"),
        (config.grad_accum > 0, "grad_accum must be at least 1"),
        (config.seq_len > 0, "seq_len must be positive"),
        (config.seq_len <= m.block_size, f"seq_len ({config.seq_len}) must not exceed block_size ({m.block_size}): lower --seq-len or raise --block-size"),
        (config.max_steps > 0, "max_steps must be positive"),
        (config.warmup_steps >= 0, "warmup_steps must not be negative"),
        (config.lr > 0, "lr must be positive"),
        (0 <= config.min_lr <= config.lr, f"min_lr ({config.min_lr}) must be between 0 and lr ({config.lr})"),
        (config.weight_decay >= 0, "weight_decay must not be negative"),
        (config.muon_lr > 0, "muon_lr must be positive"),
        (0 <= config.muon_momentum < 1, "muon_momentum must be in [0, 1)"),
        (config.muon_weight_decay >= 0, "muon_weight_decay must not be negative"),
        (0 < config.decay_fraction <= 1, "decay_fraction must be in (0, 1]"),
        (config.decay_at >= 0, "decay_at must not be negative (0: the decay starts only at the end)"),
        (config.decay_at == 0 or config.schedule == "wsd", "decay_at applies to --schedule wsd: add it, or drop --decay-at"),
        (config.grad_clip >= 0, "grad_clip must not be negative (0 turns clipping off)"),
        (config.log_interval > 0, "log_interval must be positive"),
        (config.train_tokens >= 0, "train_tokens must not be negative (0 uses all)"),
        (config.checkpoint_interval >= 0, "checkpoint_interval must not be negative (0 picks one from the step time)"),
        (config.keep_checkpoints > 0, "keep_checkpoints must be at least 1"),
        (config.max_bad_steps > 0, "max_bad_steps must be at least 1"),
        (config.eval_interval >= 0, "eval_interval must not be negative (0 turns evaluation off)"),
        (config.eval_tokens >= 0, "eval_tokens must not be negative (0 evaluates the whole split)"),
        (all(task in EVAL_TASKS for task in config.tasks),
         f"eval_tasks must be a comma-separated list of {', '.join(EVAL_TASKS)}, not {config.eval_tasks!r}"),
        (config.task_eval_interval > 0, "task_eval_interval must be positive"),
        (config.task_eval_limit >= 0, "task_eval_limit must not be negative (0 scores every item)"),
        (not (config.tasks and config.fsdp), "eval_tasks does not run under --fsdp: score the final model "
                                                  "with `gpt2train eval --task hellaswag` instead"),
        (config.target_metric != "val" or config.eval_interval > 0, "target_metric val needs evaluations: set --eval-interval"),
    ]
    for name, f in RUN_FIELDS.items():
        choices, value = f.metadata["choices"], getattr(config, name)
        checks.append((not choices or value in choices, f"{name} must be one of {', '.join(choices)}, not {value!r}"))
    for ok, message in checks:
        if not ok:
            raise UserError(f"invalid configuration: {message}")

"""The `gpt2train` command: argument parsing only; each subcommand calls a library function."""

from __future__ import annotations

import argparse
import codecs
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import MISSING
from pathlib import Path

import torch

from .bench import VARIANTS
from .config import (
    MODEL_FIELDS, MODEL_HELP, PRESETS, RUN, RUN_FIELDS, base_type, field_types, preset_config, resolve_config,
)
from .errors import UserError
from .final_model import FILE_NAMES
from .prepare import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, prepare, tokenize_inputs
from .sources import DEFAULT_HF_SPLIT, DEFAULT_TEXT_FIELD, DIRECTORY_INCLUDE

# Off a terminal, a long job's progress is printed as lines once it has run this long.
PROGRESS_AFTER_SECONDS = 5.0
MODEL_PATH_HELP = ("a final model file, a training checkpoint, a run directory (its newest checkpoint) or a Hugging "
                   "Face GPT-2 directory (default: 'saved_models/final_model.pt')")

# Exit statuses: 0 done (target reached), 1 a crash (a bug), and these; an interrupted run exits
# with 128 + the signal number, as shells report.
EXIT_USER_ERROR = 2
EXIT_TARGET_NOT_REACHED = 3
EXIT_DIVERGED = 4


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, like every other user error."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config key, defaulting to None so that only what the user typed overrides."""
    types = field_types()
    model = parser.add_argument_group("model (defaults: the gpt2 preset)")
    for name, f in MODEL_FIELDS.items():
        _add_typed_flag(model, name, types[name], f.default, MODEL_HELP[name])
    groups = {}
    for name, f in RUN_FIELDS.items():
        title = f.metadata["group"]
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
            if title == RUN:
                groups[title].add_argument("--config", metavar="FILE",
                                           help="TOML file of config keys (flag names with underscores)")
        _add_typed_flag(groups[title], name, types[name], f.default, f.metadata["help"], f.metadata["choices"])


def _add_typed_flag(group, name: str, type_: type, default, help: str, choices: tuple = ()) -> None:
    if default is not MISSING and default is not None:
        help = f"{help} (default: {default!r})"
    type_ = base_type(type_)
    if type_ is bool:
        group.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help)
    elif choices:
        group.add_argument(_flag(name), dest=name, choices=choices, default=None, help=help)
    elif name == "resume":
        group.add_argument(_flag(name), dest=name, nargs="?", const="latest", default=None, metavar="PATH",
                           help="continue a run from its newest checkpoint in --run-dir, or from PATH "
                                "(a checkpoint file or a run directory)")
    else:
        group.add_argument(_flag(name), dest=name, type=type_, default=None, metavar=name.upper(), help=help)


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    # SUPPRESS: given before the command or after it, a subcommand's parser does not reset it.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks for errors; with train, also where the start-up's seconds went")

    parser = Parser(
        prog="gpt2train",
        description="Train GPT-2 from text to a saved model, offline.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", parents=[common], help="tokenize text into token shards",
                       description="Tokenize text, JSON-lines or Parquet files (plain, .gz or .zst), directories, "
                                   "globs, URLs or Hugging Face datasets into token shards; with no inputs, the "
                                   "built-in corpus.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="a file, directory or glob; an http(s) URL (add #sha256=HEX to verify it); "
                        "hf:DATASET or hf:DATASET:CONFIG (a Hub name or a local dataset directory)")
    p.add_argument("--out", default="data", metavar="DIR", help="output directory (default: 'data')")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, metavar="F",
                   help=f"share of the text, as whole documents, held out for validation (default: {DEFAULT_VAL_FRACTION})")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="tokenizer threads (default: 0, every core)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard file (default: {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--text-field", default=DEFAULT_TEXT_FIELD, metavar="NAME",
                   help=f"the field that holds the text in JSON lines, Parquet and datasets (default: '{DEFAULT_TEXT_FIELD}')")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help=f"in directories, read the files matching GLOB; repeatable (default: {' '.join(DIRECTORY_INCLUDE)})")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="in directories, skip the files matching GLOB; repeatable")
    p.add_argument("--split", default=DEFAULT_HF_SPLIT, metavar="NAME",
                   help=f"split of hf: datasets to read (default: '{DEFAULT_HF_SPLIT}')")
    p.add_argument("--cache-dir", metavar="DIR", help="where URLs are downloaded (default: OUT/downloads)")
    p.add_argument("--overwrite", action="store_true", help="replace the prepared data already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress line (it is shown only on a terminal anyway)")
    p.set_defaults(func=cmd_prepare)

    t = sub.add_parser("train", parents=[common], help="train until the target loss, then save the final model",
                       description="Train GPT-2. Precedence: preset < --config file < flags.")
    _add_config_flags(t)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", parents=[common], help="generate text from a saved model",
                       description="Continue a prompt, printing tokens as they are generated.")
    s.add_argument("--model", default="saved_models/final_model.pt", metavar="PATH",
                   help=MODEL_PATH_HELP)
    s.add_argument("--prompt", default="", help="text to continue (default: start from <|endoftext|>)")
    s.add_argument("--prompt-file", metavar="FILE", help="continue each non-empty line of FILE in turn")
    s.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples per prompt (default: 1)")
    s.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="tokens to generate (default: 100)")
    s.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 for greedy (default: 0.8)")
    s.add_argument("--top-k", type=int, default=200, metavar="K", help="sample among the K likeliest; 0: all (default: 200)")
    s.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample among the likeliest tokens that together have probability P; 1: all (default: 1.0)")
    s.add_argument("--ignore-eot", action="store_true", help="keep going past <|endoftext|> instead of stopping there")
    s.add_argument("--seed", type=int, default=None,
                   help="random seed for reproducible samples; sample i uses seed + i (default: random)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: 'auto')")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", parents=[common], help="validation loss, perplexity and bits per byte of a saved model",
                       description="Score a model on held-out text: a prepared directory's validation split, "
                                   "text files, or (with neither) the built-in corpus's validation split.")
    e.add_argument("inputs", nargs="*", metavar="INPUT", help="text files, directories or glob patterns to score")
    e.add_argument("--model", default="saved_models/final_model.pt", metavar="PATH",
                   help=MODEL_PATH_HELP)
    e.add_argument("--data", metavar="DIR", help="a directory written by `gpt2train prepare`: its validation split")
    e.add_argument("--seq-len", type=int, default=0, metavar="N", help="tokens per window (default: the model's context)")
    e.add_argument("--batch-size", type=int, default=8, metavar="N", help="windows per forward pass (default: 8)")
    e.add_argument("--max-tokens", type=int, default=0, metavar="N", help="score only the first N tokens; 0: all (default: 0)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: 'auto')")
    e.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: 'auto')")
    e.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plot", parents=[common], help="draw a run's loss.png from its metrics.jsonl")
    pl.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (for example runs/tiny)")
    pl.set_defaults(func=cmd_plot)

    x = sub.add_parser("export", parents=[common], help="write a saved model in another format",
                       description="Write a saved model (a final model, a checkpoint or a run directory) as a "
                                   "Hugging Face GPT-2 directory (config.json, model.safetensors, tokenizer files) "
                                   "that transformers loads, or as a gpt2train final model file.")
    x.add_argument("--model", default="saved_models/final_model.pt", metavar="PATH", help=MODEL_PATH_HELP)
    x.add_argument("--format", choices=["hf", *FILE_NAMES], default="hf",
                   help="hf: a Hugging Face GPT-2 directory; pt or safetensors: the fp16 final model file a run "
                        "writes at its target (default: 'hf')")
    x.add_argument("--out", required=True, metavar="PATH",
                   help="the directory to write (hf), or the final model file (a directory: its final_model.pt)")
    x.add_argument("--trim-vocab", action="store_true",
                   help="keep GPT-2's 50,257 tokens only, dropping the padded vocabulary rows")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export in DIR")
    x.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", parents=[common], help="time training steps on synthetic tokens",
                       description="Time gpt2train's training step on synthetic tokens: ms/step, tokens/s, "
                                   "TFLOP/s, MFU and peak memory; with --compare-eager, side by side with plain "
                                   "eager PyTorch, each variant in a process of its own.")
    _add_config_flags(b)
    b.add_argument("--steps", type=int, default=10, metavar="N", help="timed steps (default: 10)")
    b.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed steps first (default: 3)")
    b.add_argument("--compare-eager", action="store_true",
                   help="also time plain eager PyTorch (fp32 and bf16 autocast on a CPU, the run's precision on a GPU)")
    b.add_argument("--compare-deterministic", action="store_true",
                   help="also time gpt2train's step with --deterministic (deterministic kernels only)")
    b.add_argument("--compare-muon", action="store_true",
                   help="also time gpt2train's step with --optimizer muon")
    b.add_argument("--generate", type=int, default=0, metavar="N",
                   help="instead, time decoding N tokens with and without the KV cache")
    b.add_argument("--variant", choices=list(VARIANTS), help="time only this variant, in this process")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=cmd_bench)

    pr = sub.add_parser("presets", parents=[common], help="list the named configurations")
    pr.set_defaults(func=cmd_presets)
    return parser


def cmd_prepare(args) -> int:
    manifest = prepare(args.inputs, args.out, val_fraction=args.val_fraction, workers=args.workers,
                       shard_tokens=args.shard_tokens, text_field=args.text_field, include=args.include,
                       exclude=args.exclude, hf_split=args.split, cache_dir=args.cache_dir,
                       overwrite=args.overwrite, progress=not args.quiet and sys.stderr.isatty())
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    print(
        f"Prepared {manifest['documents']:,} documents from {', '.join(manifest['sources'])}: "
        f"{train['tokens']:,} train tokens in {len(train['shards'])} shard(s), "
        f"{val['tokens']:,} val tokens in {len(val['shards'])} shard(s), in {args.out}"
    )
    return 0


def cmd_train(args) -> int:
    from .training.loop import train
    from .training.outcome import Outcome

    config = resolve_config(args.config, {name: getattr(args, name) for name in field_types()})
    result = train(config, debug=getattr(args, "debug", False))
    if result.status == Outcome.INTERRUPTED:
        return 128 + result.signal_number
    return {Outcome.MAX_STEPS: EXIT_TARGET_NOT_REACHED, Outcome.DIVERGED: EXIT_DIVERGED}.get(result.status, 0)


def cmd_sample(args) -> int:
    from .final_model import load_model
    from .runtime import resolve_device
    from .sample import generate
    from .tokenizer import get_tokenizer

    if not math.isfinite(args.temperature):
        raise UserError(f"--temperature must be a number (0 for greedy), not {args.temperature}")
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0 or args.num_samples < 1:
        raise UserError("--max-new-tokens, --temperature and --top-k must not be negative, --num-samples at least 1")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be in [0, 2**63), not {args.seed}")
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1], not {args.top_p}")
    if args.prompt and args.prompt_file:
        raise UserError("give either --prompt or --prompt-file, not both")
    prompts = [args.prompt]
    if args.prompt_file:
        try:
            prompts = [line for line in Path(args.prompt_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompts from {args.prompt_file}: {e}") from None
        if not prompts:
            raise UserError(f"{args.prompt_file} holds no prompts: write one prompt per line")
    model = load_model(args.model, device=resolve_device(args.device))
    enc = get_tokenizer()
    for index, (prompt, sample) in enumerate((p, i) for p in prompts for i in range(args.num_samples)):
        if index:
            print("-" * 40)
        # Tokens can end inside a multi-byte character: decode the byte stream incrementally.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sys.stdout.write(prompt)
        seed = None if args.seed is None else args.seed + sample
        for token in generate(model, enc.encode_ordinary(prompt), args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k or None, top_p=args.top_p, seed=seed,
                              stop_at_eot=not args.ignore_eot):
            sys.stdout.write(decoder.decode(enc.decode_single_token_bytes(token)))
            sys.stdout.flush()
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    return 0


def cmd_eval(args) -> int:
    from .corpus import load_corpus
    from .evaluate import evaluate
    from .final_model import load_model
    from .runtime import resolve_device, resolve_dtype

    if args.data and args.inputs:
        raise UserError("give either --data or input files, not both")
    if args.seq_len < 0 or args.batch_size < 1 or args.max_tokens < 0:
        raise UserError("--seq-len and --max-tokens must not be negative, --batch-size at least 1")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = load_model(args.model, device=device)
    seq_len = args.seq_len or model.config.block_size
    if seq_len > model.config.block_size:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context of {model.config.block_size} tokens")
    if args.inputs:
        tokens, source = tokenize_inputs(args.inputs), ", ".join(args.inputs)
    else:
        corpus = load_corpus(args.data or "")
        if corpus.note:
            print(f"gpt2train eval: {corpus.note}", file=sys.stderr)
        tokens, source = corpus.val, f"{corpus.source} (validation split)"
    if len(tokens) < 2:
        raise UserError(f"{source} holds fewer than two tokens: nothing to score")

    terminal, said, started = sys.stderr.isatty(), [0], time.monotonic()

    def progress(done: int, total: int) -> None:
        line = f"eval: {done / total:4.0%} ({done:,}/{total:,} tokens)"
        if terminal:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        elif time.monotonic() - started > PROGRESS_AFTER_SECONDS and done * 10 // total > said[0]:
            said[0] = done * 10 // total  # off a terminal, once it takes a while: a line every tenth
            print(line, file=sys.stderr, flush=True)

    result = evaluate(model, tokens, seq_len, args.batch_size, device, dtype, max_tokens=args.max_tokens,
                      progress=progress)
    if terminal:
        print(file=sys.stderr)
    if not math.isfinite(result.loss):
        raise UserError(f"{args.model} computes a non-finite loss ({result.loss}) on {source}: its weights hold "
                        "non-finite values; use another model file")
    print(f"data: {source} | tokens: {result.tokens:,} | bytes: {result.bytes:,}")
    print(f"val loss: {result.loss:.4f} | perplexity: {result.perplexity:.2f} | bits per byte: {result.bits_per_byte:.4f}")
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_run

    print(f"loss plot: {plot_run(args.run_dir)}")
    return 0


def cmd_export(args) -> int:
    from .final_model import export_final_model, load_model
    from .hf import export_hf

    if args.format != "hf":
        if args.trim_vocab:
            raise UserError("--trim-vocab applies to --format hf only: a final model keeps the padded vocabulary")
        out = export_final_model(args.model, args.out, args.format, overwrite=args.overwrite)
        print(f"Exported {args.model} to {out} as a gpt2train final model")
        return 0
    out = export_hf(load_model(args.model), args.out, trim_vocab=args.trim_vocab, overwrite=args.overwrite)
    print(f"Exported {args.model} to {out} as a Hugging Face GPT-2 directory")
    return 0


def cmd_bench(args) -> int:
    import tempfile

    from .bench import (
        as_json,
        describe,
        generation_report,
        run_in_subprocess,
        run_variant,
    )
    from .config import to_toml
    from .runtime import resolve_device

    if args.steps < 1 or args.warmup < 0 or args.generate < 0:
        raise UserError("--steps must be at least 1, --warmup and --generate not negative")
    config = resolve_config(args.config, {name: getattr(args, name) for name in field_types()})
    device = resolve_device(config.device)
    if args.generate:
        print("\n".join(generation_report(config, device, args.generate)))
        return 0
    if args.variant:
        results = [run_variant(config, args.variant, args.steps, args.warmup)]
    else:
        variants = ["gpt2train"] + (["compiled"] if device.type == "cuda" else [])
        if args.compare_deterministic:
            variants.insert(1, "gpt2train-deterministic")
        if args.compare_muon:
            variants.insert(1, "gpt2train-muon")
        if args.compare_eager:
            variants += ["eager-fp32", "eager-bf16"] if device.type == "cpu" else ["eager"]
        with tempfile.TemporaryDirectory() as tmp:
            config_file = Path(tmp) / "bench.toml"
            config_file.write_text(to_toml(config))
            argv = ["--config", str(config_file), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            results = []
            for i, variant in enumerate(variants, 1):
                print(f"bench: timing {variant} ({i} of {len(variants)}, {args.warmup} warm-up and {args.steps} "
                      "timed steps)", file=sys.stderr, flush=True)
                results.append(run_in_subprocess(argv, variant))
    print(as_json(config, results, device) if args.json else "\n".join(describe(config, results, device)))
    return 0


def cmd_presets(args) -> int:
    for name, values in PRESETS.items():
        params = preset_config(name).model.num_params()
        changes = ", ".join(f"{k}={v}" for k, v in values.items()) or "the seed's defaults"
        print(f"{name:12s} {params / 1e6:9.2f}M parameters  {changes}")
    return 0


def main(argv: list[str] | None = None, exit_now: bool = False) -> None:
    for stream in (sys.stdout, sys.stderr):
        # A path that is not UTF-8 (the shell's bytes, as surrogate escapes) is printed escaped, not an error.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (UserError, torch.OutOfMemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not isinstance(e, torch.OutOfMemoryError) and not _out_of_memory(e):
            raise  # a bug: the traceback is what to report
        if getattr(args, "debug", False):
            traceback.print_exc()
        if not isinstance(e, UserError):
            e = "out of memory: lower --batch-size or --seq-len, or use a smaller model"
        print(f"gpt2train {args.command}: error: {e}", file=sys.stderr)
        code = EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"gpt2train {args.command}: interrupted", file=sys.stderr)
        code = 128 + signal.SIGINT
    except BrokenPipeError:
        # The reader went away (`gpt2train presets | head`): end quietly, as a program killed by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    if exit_now and args.command == "train":
        # Every file is written, synced and closed by now; the interpreter's teardown (freeing a large
        # model's tensors one by one) took over a second after GPT-2 124M's run on a CPU.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run() -> None:
    """The console script: main(), and after a training run an exit without the interpreter's teardown."""
    main(exit_now=True)


def _out_of_memory(error: RuntimeError) -> bool:
    """A failed allocation of CPU memory, which torch raises as a plain RuntimeError."""
    return "can't allocate memory" in str(error) or "DefaultCPUAllocator" in str(error)

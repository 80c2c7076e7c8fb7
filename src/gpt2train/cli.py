"""The `gpt2train` command: argument parsing only; each subcommand calls a library function."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from dataclasses import MISSING

import torch

from .bench import VARIANTS
from .config import (
    EVAL_TASKS, MODEL_FIELDS, MODEL_HELP, RUN, RUN_FIELDS, base_type, field_types, preset_lines, resolve_config,
)
from .errors import EXIT_USER_ERROR, UserError
from .final_model import FILE_NAMES
from .prepare import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, prepare
from .sources import DEFAULT_HF_SPLIT, DEFAULT_TEXT_FIELD, DIRECTORY_INCLUDE

MODEL_PATH_HELP = ("a final model file, a training checkpoint, a run directory (its newest checkpoint) or a Hugging "
                   "Face GPT-2 directory (default: 'saved_models/final_model.pt')")


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


def _add_lm_eval_flags(parser: argparse.ArgumentParser) -> None:
    """eval's flags for lm-evaluation-harness tasks (the optional extra `eval`)."""
    g = parser.add_argument_group("lm-evaluation-harness (the eval extra: bash scripts/install.sh eval)")
    g.add_argument("--lm-eval", metavar="TASKS",
                   help="instead, run the harness's tasks on the model, comma-separated (for example "
                        "hellaswag,arc_easy)")
    g.add_argument("--lm-eval-include", metavar="DIR", help="also the task files (.yaml) in DIR, such as local tasks")
    g.add_argument("--num-fewshot", type=int, metavar="N", help="examples before each item (default: each task's own)")
    g.add_argument("--limit", type=int, default=0, metavar="N",
                   help="with --task or --lm-eval, score only the first N items of each task; 0: all (default: 0)")
    g.add_argument("--output", metavar="FILE",
                   help="where the results go as JSON (default: a new lm-eval-DATE-TIME.json in the current directory)")


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

    e = sub.add_parser("eval", parents=[common], help="score a saved model: loss on held-out text, or a benchmark task",
                       description="Score a model on held-out text (loss, perplexity, bits per byte): a prepared "
                                   "directory's validation split, text files, or (with neither) the built-in corpus's "
                                   "validation split. With --task hellaswag, its accuracy on HellaSwag instead; with --lm-eval, "
                                   "lm-evaluation-harness's tasks.")
    e.add_argument("inputs", nargs="*", metavar="INPUT", help="text files, directories or glob patterns to score")
    e.add_argument("--model", default="saved_models/final_model.pt", metavar="PATH",
                   help=MODEL_PATH_HELP)
    e.add_argument("--data", metavar="PATH", help="a directory written by `gpt2train prepare`: its validation split; "
                                                  "with --task hellaswag, a local copy of hellaswag_val.jsonl")
    e.add_argument("--task", choices=EVAL_TASKS,
                   help="score a benchmark task: hellaswag (its validation set, downloaded into the gpt2train cache "
                        "on first use unless --data gives a copy)")
    e.add_argument("--json", action="store_true", help="with --task, print the results as one JSON object")
    e.add_argument("--seq-len", type=int, default=0, metavar="N", help="tokens per window (default: the model's context)")
    e.add_argument("--batch-size", type=int, default=8, metavar="N", help="windows per forward pass (default: 8)")
    e.add_argument("--max-tokens", type=int, default=0, metavar="N", help="score only the first N tokens; 0: all (default: 0)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: 'auto')")
    e.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: 'auto')")
    _add_lm_eval_flags(e)
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

    config = resolve_config(args.config, {name: getattr(args, name) for name in field_types()})
    return train(config, debug=getattr(args, "debug", False)).exit_status


def cmd_sample(args) -> int:
    from .sample import print_samples

    print_samples(args.model, args.prompt, args.prompt_file, args.num_samples, args.max_new_tokens, args.temperature,
                  args.top_k, args.top_p, args.seed, args.ignore_eot, args.device)
    return 0


def cmd_eval(args) -> int:
    from .model_eval import score_task, score_text

    if args.task and args.lm_eval is not None:
        raise UserError("give either --task or --lm-eval, not both")
    if args.lm_eval is not None or (not args.task and _lm_eval_only_flags(args)):
        return cmd_lm_eval(args)
    if args.task and args.inputs:
        raise UserError(f"--task {args.task} scores the task's own data: drop the input files")
    if args.task and (args.lm_eval_include or args.num_fewshot is not None or args.output):
        raise UserError("--lm-eval-include, --num-fewshot and --output apply to --lm-eval TASKS only")
    if args.task:
        lines = score_task(args.model, args.task, args.data, args.limit, args.device, args.dtype, args.json)
    else:
        lines = score_text(args.model, args.inputs, args.data, args.seq_len, args.batch_size, args.max_tokens,
                           args.device, args.dtype)
    for line in lines:
        print(line)
    return 0


def _lm_eval_only_flags(args) -> list[str]:
    """The flags given that mean something only with --lm-eval (or, for --limit, --task)."""
    given = {"--lm-eval-include": args.lm_eval_include, "--num-fewshot": args.num_fewshot, "--output": args.output,
             "--limit": args.limit or None}
    return [flag for flag, value in given.items() if value is not None]


def cmd_lm_eval(args) -> int:
    from .device import resolve_device, resolve_dtype
    from .harness import new_results_path, run_lm_eval

    if args.lm_eval is None:
        raise UserError(f"{', '.join(_lm_eval_only_flags(args))} apply to --lm-eval TASKS only")
    if args.inputs or args.data:
        raise UserError("--lm-eval scores the harness's tasks: give no input files or --data with it")
    tasks = [task.strip() for task in args.lm_eval.split(",") if task.strip()]
    if not tasks:
        raise UserError("--lm-eval needs task names, comma-separated (for example --lm-eval hellaswag,arc_easy)")
    if (args.num_fewshot or 0) < 0 or args.limit < 0:
        raise UserError("--num-fewshot and --limit must not be negative")
    output = new_results_path(args.output)
    device = resolve_device(args.device)
    run_lm_eval(args.model, tasks, include=args.lm_eval_include, num_fewshot=args.num_fewshot,
                limit=args.limit or None, device=device, dtype=resolve_dtype(args.dtype, device), output=output)
    print(f"results: {output}")
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
    from .bench import as_json, compare_variants, describe, generation_report, run_variant
    from .device import resolve_device

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
        results = compare_variants(config, device, args.steps, args.warmup, eager=args.compare_eager,
                                   deterministic=args.compare_deterministic, muon=args.compare_muon)
    print(as_json(config, results, device) if args.json else "\n".join(describe(config, results, device)))
    return 0


def cmd_presets(args) -> int:
    print("\n".join(preset_lines()))
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

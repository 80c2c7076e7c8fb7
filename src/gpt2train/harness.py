"""lm-evaluation-harness tasks on a gpt2train model, in process: an adapter of the harness's LM interface."""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import importlib.util
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .device import autocast
from .errors import UserError
from .files import atomic_write, check_writable_dir
from .final_model import load_model
from .model import GPT
from .optional import install_command, require
from .sample import generate
from .scoring import Request, loglikelihoods
from .tokenizer import EOT_ID, get_tokenizer

# The oldest release with what the adapter and run_lm_eval use (TemplateLM.prefix_token_id and
# utils.handle_non_serializable came in 0.4.3); pyproject.toml's `eval` extra asks for it.
LOWEST_VERSION = "0.4.3"
PURPOSE = "--lm-eval"
NEEDS = "lm-evaluation-harness"
DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for generate_until requests that set none


def _harness():
    """lm_eval with the parts this module uses, or a one-line UserError: how to install it, or which
    version is installed and which are supported."""
    try:
        lm_eval = require("lm_eval", PURPOSE, "eval", needs=NEEDS)
        from lm_eval import evaluator, utils
        from lm_eval.api.model import TemplateLM
        from lm_eval.tasks import TaskManager

        for owner, name in ((evaluator, "simple_evaluate"), (utils, "make_table"), (utils, "handle_non_serializable"),
                            (utils, "get_rolling_token_windows"), (utils, "make_disjoint_window"),
                            (TemplateLM, "_encode_pair"), (TemplateLM, "prefix_token_id"),
                            (TaskManager, "match_tasks"), (TaskManager, "all_tasks")):
            getattr(owner, name)
    except UserError:
        raise
    except Exception as e:  # a part missing, or an older harness that fails to import beside newer libraries
        try:
            version = importlib.metadata.version("lm_eval")
        except importlib.metadata.PackageNotFoundError:
            version = "of unknown version"
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        raise UserError(f"{PURPOSE} works with {NEEDS} {LOWEST_VERSION} or later (0.4 series), not the installed "
                        f"{version} ({reason}): install a supported one with `{install_command('eval', 'lm_eval')}`"
                        ) from None
    return lm_eval


@functools.cache
def _adapter_class():
    """The adapter, built on first use so that importing gpt2train never imports lm_eval."""
    from lm_eval import utils
    from lm_eval.api.model import TemplateLM
    from tqdm import tqdm  # a dependency of lm_eval

    class GPT2TrainLM(TemplateLM):
        """A gpt2train GPT as the harness's LM. TemplateLM's own `loglikelihood` splits each (context,
        continuation) into tokens exactly as the harness's `hf` model does (`_encode_pair`), so the
        numbers match `lm_eval --model hf` on the model's Hugging Face export."""

        def __init__(self, model: GPT, device: torch.device, dtype: torch.dtype, batch_tokens: int = 0):
            super().__init__()
            self.model = model.eval()
            self._device = device
            self.dtype = dtype
            self.batch_tokens = batch_tokens
            # Not `self.tokenizer`: the harness reads that as a Hugging Face tokenizer (chat templates,
            # the results' tokenizer info).
            self.encoding = get_tokenizer()

        @property
        def eot_token_id(self) -> int:
            return EOT_ID

        @property
        def max_length(self) -> int:
            return self.model.config.block_size

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return self.encoding.encode_ordinary(string)  # GPT-2 adds no special tokens to a text

        def tok_decode(self, tokens: Sequence[int]) -> str:
            return self.encoding.decode(list(tokens))

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            pairs = [Request(tuple(context), tuple(continuation)) for _, context, continuation in requests]
            scores = self._score(pairs, "Running loglikelihood requests", disable_tqdm)
            return [(score.logprob, score.greedy) for score in scores]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            # Each text's tokens in the harness's disjoint windows: every token predicted once, with as
            # much context as the model's positions hold; the first from <|endoftext|>.
            windows, owners = [], []
            for index, (text,) in enumerate(request.args for request in requests):
                for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                        token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length, context_len=1)):
                    windows.append(Request(tuple(context), tuple(continuation)))
                    owners.append(index)
            totals = [0.0] * len(requests)
            scores = self._score(windows, "Running loglikelihood_rolling requests", disable_tqdm)
            for owner, score in zip(owners, scores):
                totals[owner] += score.logprob
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            return [self._generate(context, gen_kwargs)
                    for context, gen_kwargs in tqdm([request.args for request in requests], disable=disable_tqdm,
                                                    desc="Running generate_until requests")]

        def _score(self, requests: list, description: str, disable_tqdm: bool) -> list:
            with tqdm(total=len(requests), disable=disable_tqdm, desc=description) as bar:
                return loglikelihoods(self.model, requests, self._device, self.dtype, self.batch_tokens,
                                      progress=lambda done, total: bar.update(done - bar.n))

        def _generate(self, context: str, gen_kwargs: dict) -> str:
            """One continuation, decoded with the KV cache until a stop string, <|endoftext|> or the token
            limit; the text before the first stop string."""
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [s for s in ([until] if isinstance(until, str) else until) if s]
            max_gen_toks = int(kwargs.pop("max_gen_toks", None) or kwargs.pop("max_new_tokens", None)
                               or DEFAULT_MAX_GEN_TOKS)
            if max_gen_toks >= self.max_length:
                raise UserError(f"a task asks for up to {max_gen_toks} generated tokens, as many as the model's "
                                f"context of {self.max_length} or more: use a model with a longer context")
            temperature = float(kwargs.get("temperature") or 0.0)
            if not kwargs.get("do_sample", temperature > 0):
                temperature = 0.0  # do_sample False is greedy whatever the temperature, as in transformers
            # The context cut from the left to leave room for the new tokens, as the hf model cuts it.
            ids = self.tok_encode(context)[-(self.max_length - max_gen_toks):]
            # A sampling seed from torch's generator, which the harness seeds: reproducible runs.
            seed = int(torch.randint(2**62, ())) if temperature else None
            tokens: list[int] = []
            with autocast(self._device, self.dtype):
                for token in generate(self.model, ids, max_gen_toks, temperature=temperature,
                                      top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"), seed=seed):
                    tokens.append(token)
                    text = self.tok_decode(tokens)
                    cut = min((i for i in (text.find(s) for s in until) if i >= 0), default=-1)
                    if cut >= 0:
                        return text[:cut]
            return self.tok_decode(tokens)

    return GPT2TrainLM


def lm_eval_model(model: GPT, dtype: torch.dtype = torch.float32, batch_tokens: int = 0):
    """`model` as an lm-evaluation-harness LM (an instance of its TemplateLM), for simple_evaluate or any
    of the harness's functions that take a model; it runs on the device the model is on, in `dtype`.
    `batch_tokens`: tokens per forward pass (0: a default for the device)."""
    _harness()
    return _adapter_class()(model, next(model.parameters()).device, dtype, batch_tokens)


def run_lm_eval(
    model: GPT | str | Path, tasks: Sequence[str], include: str | Path | None = None, num_fewshot: int | None = None,
    limit: int | None = None, device: torch.device | None = None, dtype: torch.dtype = torch.float32,
    output: str | Path | None = None,
) -> dict:
    """Run the harness's `tasks` (names or glob patterns; with `include`, also the task files of that
    directory) on `model` (a GPT, run on the device it is on, or a path `load_model` reads onto
    `device`), print its results table as the harness prints it, write the results to `output` as JSON,
    and return them.

    The task names, `include` and `output` are checked before the model is loaded or run. `limit`:
    the first N items of each task (None: all); `num_fewshot`: None for each task's own.
    """
    lm_eval = _harness()
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    if include is not None and not Path(include).is_dir():
        raise UserError(f"--lm-eval-include {include} is not a directory: give the directory that holds the task "
                        "files (.yaml)")
    manager = TaskManager(include_path=str(include) if include is not None else None)
    matched = []
    for task in tasks:
        names = manager.match_tasks([task])
        if not names:
            raise UserError(_unknown_task(task, include, manager.all_tasks))
        matched += [name for name in names if name not in matched]
    if output is not None:
        check_writable_dir(Path(output).parent, "lm-evaluation-harness results")
    name = "gpt2train model"
    if isinstance(model, (str, Path)):
        name, model = str(model), load_model(model, device=device)
    results = lm_eval.simple_evaluate(model=lm_eval_model(model, dtype), tasks=matched,
                                      num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False)
    # What the harness records as the model is the adapter's class name otherwise.
    results["config"].update(model=name, model_num_parameters=model.num_params())
    print(f"gpt2train ({name}), limit: {limit}, num_fewshot: {num_fewshot}")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if output is not None:
        text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"
        atomic_write(output, lambda f: f.write(text.encode()))
    return results


def _unknown_task(task: str, include: str | Path | None, known: Sequence[str]) -> str:
    """The one line for a task name the harness does not have: close names, and how to list them all."""
    where = f" or in {include}" if include is not None else ""
    close = difflib.get_close_matches(task, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    # The harness's command line lists its tasks with `lm_eval ls tasks` since it has subcommands.
    listing = "lm_eval ls tasks" if importlib.util.find_spec("lm_eval._cli") else "lm_eval --tasks list"
    listing += f" --include_path {include}" if include is not None else ""
    return (f"unknown lm-evaluation-harness task '{task}'{hint}: no such task in the harness{where}; "
            f"list them with `{listing}`")


def new_results_path(given: str | None = None) -> Path:
    """Where the results go: `given`, else lm-eval-DATE-TIME.json in the current directory, with a number
    added where that is taken: an earlier result is never replaced."""
    if given:
        return Path(given)
    stem = time.strftime("lm-eval-%Y%m%d-%H%M%S")
    path, n = Path(f"{stem}.json"), 1
    while path.exists():
        path, n = Path(f"{stem}-{n}.json"), n + 1
    return path

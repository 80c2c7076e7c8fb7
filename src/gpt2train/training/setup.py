"""Building a run from its plan: the process (ranks, device, precision), the data, the model and its
step, the learning-rate schedule, and the run's state, restored from its checkpoint when resumed."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import hellaswag
from ..config import TrainConfig
from ..corpus import Corpus, load_corpus
from ..data import SAMPLERS, Sampler
from ..device import check_fits, resolve_device, resolve_dtype, skip_init, start_device
from ..errors import UserError
from ..hf import read_hf_model
from ..model import GPT
from ..runtime import configure_backends, fit_threads_to_free_cores, import_in_background, seed_everything
from . import distributed
from .checkpoints import Checkpointer
from .distributed import World
from .monitor import LossMonitor
from .parallel import FullModelState, FullOptimizerState
from .prefetch import Prefetcher
from .resume import RunPlan
from .rundir import RunLock, claim_run_dir
from .schedule import WarmupCosine, WarmupStableDecay, build_schedule
from .state import RandomState, RunState
from .step import Stepper, build_stepper


@dataclass
class RunParts:
    """Everything a run is made of, ready for its first step."""

    config: TrainConfig  # for a resumed run, the checkpoint's config with the given settings on top
    world: World
    plan: RunPlan
    device: torch.device
    dtype: torch.dtype
    corpus: Corpus
    train_tokens: int  # of the training split, the ones the run draws from
    sampler: Sampler
    task_items: list[hellaswag.Item]  # what --eval-tasks scores (HellaSwag's items); empty: none
    model: GPT
    stepper: Stepper
    schedule: WarmupCosine | WarmupStableDecay
    monitor: LossMonitor
    state: RunState
    checkpointer: Checkpointer
    step: int  # the last step done: 0 for a new run, the checkpoint's for a resumed one
    lock: RunLock | None  # on rank 0, the run directory's: release it when the run ends
    notes: list[str]  # for the header: what the set-up chose that a user should know
    timings: dict[str, float | None]  # seconds each part of the start-up took, in order


def build_model(config: TrainConfig, device: torch.device, new: bool) -> GPT:
    """The model, built on its device and initialised there, once: GPT-2's init for a new run, the
    Hugging Face weights with --init-from; a resumed run's weights come from its checkpoint."""
    with torch.device(device), skip_init():  # no default init to draw and throw away
        model = GPT(config.model)
    if new and config.init_from:
        model.load_state_dict(read_hf_model(config.init_from)[1])
    elif new:
        model.init_weights()
    return model


def build_run(plan: RunPlan, world: World, lap: Laps) -> RunParts:
    """Set up the run `plan` decided on, new or resumed; refused, before anything on disk changes, if
    it must be. `lap` times each part."""
    config = plan.config
    device = distributed.join(world, resolve_device(config.device))
    dtype = resolve_dtype(config.dtype, device)
    check_fits(config, device)
    notes = [note] if (note := configure_backends(device, deterministic=config.deterministic)) else []
    # A CPU's sums depend on the thread count: a deterministic run keeps the same count whatever the load.
    if device.type == "cpu" and not config.deterministic and (note := fit_threads_to_free_cores()):
        notes.append(note)
    start_device(device)
    lap("device")
    seed_everything(config.seed)  # the same on every rank: the same initial weights and dropout

    corpus = load_corpus(config.data)
    if corpus.note:
        notes.append(corpus.note)
    if config.target_metric == "val" and len(corpus.val) < 2:
        raise UserError(f"--target-metric val needs a validation split, and {corpus.source} has none: "
                        "prepare the data with a --val-fraction above 0")
    tokens = corpus.train[: config.train_tokens] if config.train_tokens else corpus.train
    sampler = SAMPLERS[config.sampling](tokens, config.batch_size, config.seq_len, seed=config.seed,
                                        rank=world.rank, world_size=world.size)
    if device.type == "cuda":
        sampler = Prefetcher(sampler)
    task_items = _task_items(config, world)
    lap("data")

    # The first optimizer built imports torch._dynamo (1.5 s on a CPU): import it while the model is
    # built, in torch's kernels, which leave Python's lock free.
    dynamo = import_in_background("torch._dynamo")
    model = build_model(config, device, not plan.resumed)
    dynamo.join()
    lap("model")
    stepper = build_stepper(model, config, device, dtype, world)
    schedule = build_schedule(config)

    monitor = LossMonitor()
    state = RunState(world)
    state.register("model", FullModelState(model, stepper.sharded))
    state.register("optimizer", FullOptimizerState(model, stepper.optimizers, stepper.sharded))
    state.register("schedule", schedule, optional=True)  # checkpoints from before schedules had state lack it
    state.register("scaler", stepper.scaler)
    state.register("monitor", monitor)
    state.register("sampler", sampler, per_rank=True)
    state.register("rng", RandomState(), per_rank=True)
    data = {"source": corpus.source, "text_sha256": corpus.text_sha256, "train_tokens": len(tokens)}
    checkpointer = Checkpointer(config, state, plan.run_id, data, world)
    step = checkpointer.restore(plan.saved, plan.checkpoint) if plan.resumed else 0
    lock = claim_run_dir(config, plan.resumed, world)  # the first change on disk: every refusal came before
    lap("step, state and run directory")
    return RunParts(config, world, plan, device, dtype, corpus, len(tokens), sampler, task_items, model, stepper, schedule,
                 monitor, state, checkpointer, step, lock, notes, lap.timings)


def _task_items(config: TrainConfig, world: World) -> list[hellaswag.Item]:
    """HellaSwag's items for --eval-tasks, this rank's share of them: fetched into the cache by rank 0
    first, so that ranks never write the same download at once."""
    if not config.tasks:
        return []
    if world.is_main:
        hellaswag.dataset_path(config.task_eval_data)
    distributed.barrier(world)
    items = hellaswag.read_items(hellaswag.dataset_path(config.task_eval_data), config.task_eval_limit)
    return items[world.rank :: world.size]


class Laps:
    """Seconds between calls, under each call's name."""

    def __init__(self, timings: dict[str, float | None]):
        self.timings, self.last = timings, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name], self.last = now - self.last, now

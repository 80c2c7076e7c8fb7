"""gpt2train: train GPT-2 from text to a saved model."""

from .config import TrainConfig, resolve_config
from .final_model import load_model
from .model import GPT, GPTConfig
from .prepare import prepare
from .sample import generate
from .tokenizer import get_tokenizer
from .training.loop import train

__version__ = "0.1.0"
__all__ = [
    "GPT",
    "GPTConfig",
    "TrainConfig",
    "generate",
    "get_tokenizer",
    "load_model",
    "prepare",
    "resolve_config",
    "train",
]

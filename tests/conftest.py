import atexit
import os
import shutil
import tempfile

# The token cache (and anything else gpt2train caches) of the test session: its own, removed at the end.
os.environ["GPT2TRAIN_CACHE"] = tempfile.mkdtemp(prefix="gpt2train-test-cache-")
atexit.register(shutil.rmtree, os.environ["GPT2TRAIN_CACHE"], True)

# The tests compare numbers between runs, and torch's CPU reductions add in an order that depends on the
# thread count: pinned, so that gpt2train never lowers it for a run on a machine that is busy meanwhile.
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1))

import pytest
from helpers import prepare_small_corpus


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A prepared data directory holding a few hundred tokens of text (shared: treat as read-only)."""
    return prepare_small_corpus(tmp_path_factory.mktemp("corpus"))

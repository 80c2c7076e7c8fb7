import atexit
import http.server
import os
import shutil
import tempfile
import threading

# The token cache (and anything else gpt2train caches) of the test session: its own, removed at the end.
os.environ["GPT2TRAIN_CACHE"] = tempfile.mkdtemp(prefix="gpt2train-test-cache-")
atexit.register(shutil.rmtree, os.environ["GPT2TRAIN_CACHE"], True)

# The tests compare numbers between runs, and torch's CPU reductions add in an order that depends on the
# thread count: pinned, so that gpt2train never lowers it for a run on a machine that is busy meanwhile.
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1))

import pytest
from helpers import RangeHandler, prepare_small_corpus


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A prepared data directory holding a few hundred tokens of text (shared: treat as read-only)."""
    return prepare_small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 serving `server.files` (path -> bytes); `server.requests` lists what was asked."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.files, httpd.requests = {}, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()

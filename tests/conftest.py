import pytest
from helpers import prepare_small_corpus


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A prepared data directory holding a few hundred tokens of text (shared: treat as read-only)."""
    return prepare_small_corpus(tmp_path_factory.mktemp("corpus"))

"""Shared fixtures: an isolated cache folder, the real-data root when CI provides one, one thread per module."""

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own BENCH_CACHE_DIR, except that decoded real datasets are shared."""
    cache = tmp_path_factory.mktemp("cache")
    shared = tmp_path_factory.getbasetemp() / "shared-datasets"
    shared.mkdir(exist_ok=True)
    (cache / "datasets").symlink_to(shared, target_is_directory=True)
    monkeypatch.setenv("BENCH_CACHE_DIR", str(cache))
    yield cache


@pytest.fixture
def data_dir() -> Path:
    """The real data root from BENCH_DATA_DIR; skip when unset, fail when set but missing."""
    root = os.environ.get("BENCH_DATA_DIR")
    if not root:
        pytest.skip("BENCH_DATA_DIR is not set (real-data test)")
    path = Path(root)
    if not path.is_dir():
        pytest.fail(f"BENCH_DATA_DIR={root} is set but is not a folder")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    as fast as two for such models, and it does not spin on OpenMP barriers on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Shared test setup.

* every test starts from the same random state;
* fixtures several test files share: ``single_thread``, ``cache_dir``, ``sae_lens`` (builders that are
  plain functions are in ``tests/builders.py``);
* under pytest-xdist (``make test`` runs ``-n 2 --dist loadscope``) each notebook's cells stay in
  one worker and in order (nbval runs them in one kernel), the language-model notebooks share one
  group (they reuse the default model that the first of them trains and caches), and that group is
  queued first because it is the longest chain of work.
"""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

# notebooks that load SmolLM2 and share cached activations / SAEs: run one after another on one worker
LM_NOTEBOOKS = ("06_", "07_", "08_")


def xdist_group_name(path: Path) -> str:
    """The pytest-xdist group of every test item collected from ``path``.

    The language-model notebooks share ``"lm-notebooks"``; every other file is its own group (named
    by its path, so test files of the same name in two folders stay apart), so a notebook's cells
    (and a test module's module-scoped fixtures) are never split between workers.
    """
    if path.suffix == ".ipynb" and path.name.startswith(LM_NOTEBOOKS):
        return "lm-notebooks"
    return path.as_posix()


def _group_of(nodeid: str) -> str:
    return xdist_group_name(Path(nodeid.split("::", 1)[0]))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Schedule work units of whole groups (:func:`xdist_group_name`), queued in collection order.

    Equivalent to ``--dist loadgroup`` with marks, which pytest 9.2 breaks (xdist renames items
    through ``item._nodeid``, which pytest 9.2 no longer reads).
    """
    from xdist.scheduler import LoadScopeScheduling

    class NotebookGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group_of(nodeid)

    return NotebookGroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    # the xdist queue follows this order (make test passes --no-loadscope-reorder): the LM chain
    # first, then the other notebooks, then the unit tests; the sort is stable, so each file's
    # cells and tests keep their order
    def rank(item):
        group = _group_of(item.nodeid)
        return 0 if group == "lm-notebooks" else 1 if group.endswith(".ipynb") else 2

    items.sort(key=rank)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op torch thread for a module of tiny-tensor tests (faster, and no oversubscription
    of a shared machine); the previous count is restored afterwards. Use with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """The test's ``tmp_path``, set as saelib's cache folder (``SAELIB_CACHE_DIR``) for the test."""
    monkeypatch.setenv("SAELIB_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def sae_lens():
    """The ``sae_lens`` module (a notebooks extra); tests that need it are skipped without it."""
    return pytest.importorskip("sae_lens")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield

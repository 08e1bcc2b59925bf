import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# The test models are tiny: one thread is fastest, and it keeps parallel runs from oversubscribing the cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


TIERS = ("unit", "sim", "e2e")  # registered in pyproject.toml; `make test-fast` runs -m unit


# `make test` spreads whole modules over pytest-xdist workers (--dist loadscope; every noprop-sim run lives in
# tests/test_sim.py, so one Ray cluster runs at a time). Modules start in this order: the longest first
# (measured with --durations), then modules with real processes, federations in process, the rest. The order
# only decides when a module starts; a stale list slows the suite, nothing more.
LONGEST_FIRST = ("test_faults.py", "test_sim.py", "test_e2e.py", "test_restart_memory.py", "test_worker_faults.py",
                 "test_security.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """A test marked with none of the tiers is a unit test. A test must not carry two tiers (a module's
    pytestmark and its own mark): -m would then select it in both. Then the modules are put in order (above)."""
    rank: dict[Path, int] = {}
    first: dict[Path, int] = {}
    for i, item in enumerate(items):
        tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
        if len(tiers) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {' and '.join(sorted(tiers))}: give it one tier")
        if not tiers:
            item.add_marker(pytest.mark.unit)
            tiers = {"unit"}
        rank[item.path] = max(rank.get(item.path, 0), TIERS.index(tiers.pop()))
        first.setdefault(item.path, i)

    def order(path: Path) -> tuple[int, int, int]:
        named = LONGEST_FIRST.index(path.name) if path.name in LONGEST_FIRST else len(LONGEST_FIRST)
        return named, -rank[path], first[path]

    items.sort(key=lambda item: order(item.path))

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


def pytest_collection_modifyitems(config, items):
    """A test marked with none of the tiers is a unit test. A test must not carry two tiers (a module's
    pytestmark and its own mark): -m would then select it in both."""
    for item in items:
        tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
        if len(tiers) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {' and '.join(sorted(tiers))}: give it one tier")
        if not tiers:
            item.add_marker(pytest.mark.unit)

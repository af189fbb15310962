"""Shared fixtures: a small synthetic dataset with planted defects and a model fitted on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibration.synthetic import make_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def net(tmp_path):
    """A Net (tests/plumbing.py): one Context, ipc endpoints under tmp_path; destroyed after the test."""
    from plumbing import Net

    n = Net(tmp_path)
    yield n
    n.close()


@pytest.fixture
def slow_index(monkeypatch):
    """slow_index(kind): from then on every search of a bank of that index kind takes 20 ms more, so
    index auto's timing (at fit or where a model is served) finds the other kind faster."""
    import time

    from engines.banks import MemoryBank

    search = MemoryBank.search

    def slow(kind: str) -> None:
        def slowed(self, q, k=1, exclude=None):
            if self.config.index == kind:
                time.sleep(0.02)
            return search(self, q, k, exclude)

        monkeypatch.setattr(MemoryBank, "search", slowed)

    return slow


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "product", n_train=12, n_good=4, n_defect=3, size=128)


@pytest.fixture(scope="session")
def fitted_model(synthetic_data, tmp_path_factory) -> Path:
    """A model fitted through the CLI on the synthetic data (real Lite0 weights, 128 px input)."""
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("models") / "product"
    code = main(["fit", str(synthetic_data), "-o", str(out), "--input-size", "128", "--coreset-ratio", "0.25",
                 "--threads", "2"])
    assert code == 0
    return out

"""Fixtures for the engine tests: generated datasets and small trained runs shared by the session.

Runs use LeNet with random or test-made weights on CPU, so the suite never needs the network or a GPU,
and every cache goes to a temporary folder (never ~/.cache).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import Trained, lenet_config, make_shapes_dataset, one_torch_thread, run_training


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 24 coloured-shape PNGs (40 px)."""
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), per_class=24, seed=0)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def full_run(shapes_data: Path, session_cache: Path, runs_dir: Path) -> Trained:
    """LeNet trained from random weights on the shapes (strategy full). Tests must not modify it."""
    return run_training(lenet_config(shapes_data, runs_dir / "full", session_cache))


@pytest.fixture(scope="session")
def lenet_weights(full_run: Trained) -> Path:
    """A local weights file (the full run's best model) to start frozen and two-stage runs from."""
    return full_run.run_dir / "best" / "model.safetensors"


@pytest.fixture(scope="session")
def frozen_run(shapes_data: Path, session_cache: Path, runs_dir: Path, lenet_weights: Path) -> Trained:
    config = lenet_config(
        shapes_data, runs_dir / "frozen", session_cache, weights=str(lenet_weights), strategy="frozen", lr=1e-2
    )
    return run_training(config)


@pytest.fixture(scope="session")
def two_stage_run(shapes_data: Path, session_cache: Path, runs_dir: Path, lenet_weights: Path) -> Trained:
    config = lenet_config(
        shapes_data, runs_dir / "two-stage", session_cache, weights=str(lenet_weights), strategy="two-stage", lr=1e-2
    )
    return run_training(config)

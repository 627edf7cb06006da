"""Shared pytest fixtures: the fsaverage5 mesh (loaded once) and a working folder."""

import numpy as np
import pytest

from neuroatrophy.surface import load_fsaverage5


@pytest.fixture(scope="session")
def fsaverage5():
    """The fsaverage5 inflated mesh, both hemispheres (shared; its arrays are read-only)."""
    return load_fsaverage5("inflated")


@pytest.fixture
def rng():
    """A freshly seeded random generator, so every test is reproducible on its own."""
    return np.random.default_rng(20240607)


@pytest.fixture
def in_tmp_path(tmp_path, monkeypatch):
    """Run the test with ``tmp_path`` as the working directory; yields ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    return tmp_path

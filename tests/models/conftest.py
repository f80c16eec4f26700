import pytest

from loraforge import testing


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory):
    """A saved tiny model folder per architecture (the same weights for every test that loads one)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: testing.save_tiny_model(root / arch, arch=arch, seed=3) for arch in testing.ARCHITECTURES}

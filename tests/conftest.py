import pytest

from tests.fixtures import FAMILIES, make_tiny


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Model directories of every family, built once per test session."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny(family, root / family) for family in FAMILIES}

import pytest

from spoold.tinymodel import build_tiny_model

from ..helpers import REPO


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny local Llama, built once and kept in .cache/ between runs."""
    return build_tiny_model(REPO / ".cache" / "tiny-llama")

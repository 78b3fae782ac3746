import pytest

from spoold.tinymodel import build_tiny_model

from ..helpers import REPO


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny local Llama, built once and kept in .cache/ between runs."""
    return build_tiny_model(REPO / ".cache" / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_b():
    """A second tiny Llama, wider and from another seed: a different model to swap to."""
    return build_tiny_model(REPO / ".cache" / "tiny-llama-b", seed=1, hidden_size=192)

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


@pytest.fixture(scope="session")
def tiny_scorer(tiny_model_b):
    """A tiny cross-encoder: the second tiny Llama with a one-label classification head, which vLLM
    serves as a pooling model (/v1/score, /v1/rerank, /rerank, /v2/rerank). Built once, kept in .cache/."""
    dest = REPO / ".cache" / "tiny-llama-scorer"
    if not (dest / "model.safetensors").exists():
        import shutil

        import torch
        from transformers import LlamaConfig, LlamaForSequenceClassification

        building = dest.with_name(dest.name + ".part")
        shutil.rmtree(building, ignore_errors=True)
        shutil.copytree(tiny_model_b, building, ignore=shutil.ignore_patterns("*.safetensors"))
        config = LlamaConfig.from_pretrained(tiny_model_b, num_labels=1,
                                             architectures=["LlamaForSequenceClassification"])
        torch.manual_seed(2)
        LlamaForSequenceClassification(config).save_pretrained(building, safe_serialization=True)
        building.rename(dest)
    return dest

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def bundled_model():
    from analysis.study.evaluate import load_model
    return load_model()


TINY_TRAINED = {"text_layers": 4, "text_width": 32, "text_heads": 2, "text_kv_heads": 2, "vision_layers": 1,
                "vision_width": 32, "patch_size": 16}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny LLaVA folder in the bundled model's format (2 training steps) with random LVPruning modules."""
    from analysis.bundled.train import train
    from analysis.study.evaluate import load_model
    from lofi.methods.lvpruning import DecisionModules
    out = tmp_path_factory.mktemp("models") / "tiny-llava"
    train(out, steps=2, batch_size=2, turns=1, lr=1e-3, seed=0, eval_every=0, config_overrides=TINY_TRAINED,
          progress=False)
    model, _ = load_model(out)
    DecisionModules.for_model(model).save(out / "lvpruning")
    return out

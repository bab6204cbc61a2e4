"""An interrupted training run resumes from its checkpoint and ends exactly where an uninterrupted run ends."""

import json

import pytest
import torch
from safetensors.torch import load_file

from analysis.bundled import batches as batches_module
from analysis.bundled import checkpoint
from analysis.bundled import train as train_bundled

TINY = {"text_layers": 2, "text_width": 32, "text_heads": 2, "text_kv_heads": 2, "vision_layers": 1, "vision_width": 32}
RUN = dict(steps=4, batch_size=2, turns=2, eval_every=0, curriculum=2, vision_warmup=2, config_overrides=TINY,
           image_norm="background", checkpoint_every=2, progress=False)


class Interrupted(Exception):
    pass


def _interrupt_after(monkeypatch, calls: int):
    """Make the training stream fail on its ``calls + 1``-th batch, as a killed run stops mid-way."""
    real, seen = batches_module.ConversationBatches.__next__, []

    def next_or_fail(self):
        seen.append(1)
        if len(seen) > calls:
            raise Interrupted
        return real(self)
    monkeypatch.setattr(batches_module.ConversationBatches, "__next__", next_or_fail)


def test_an_interrupted_run_resumes_and_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    whole = train_bundled.train(tmp_path / "whole", **RUN)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2 + 3)  # the 2 warm-up batches, then training steps 1-3; step 4 fails
        with pytest.raises(Interrupted):
            train_bundled.train(tmp_path / "resumed", **RUN)
    partial = tmp_path / "resumed.partial"
    state = torch.load(partial / checkpoint.FILE, weights_only=False)
    assert state["step"] == 2 and not (tmp_path / "resumed").exists()
    resumed = train_bundled.train(tmp_path / "resumed", **RUN)
    assert not partial.exists() and not (tmp_path / "resumed" / checkpoint.FILE).exists()
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "resumed" / "training_log.jsonl").open()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert resumed.final_loss == whole.final_loss and resumed.steps == whole.steps


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2 + 3)
        with pytest.raises(Interrupted):
            train_bundled.train(tmp_path / "run", **RUN)
    assert (tmp_path / "run.partial" / checkpoint.FILE).is_file()
    other = {**RUN, "lr": RUN.get("lr", 2e-3) / 2}
    config = train_bundled.check(train_bundled.TrainingConfig(**{k: v for k, v in other.items() if k != "progress"}))
    assert checkpoint.load(tmp_path / "run.partial", config) is None
    train_bundled.train(tmp_path / "run", **other)  # starts afresh: four steps logged, one run
    log = [json.loads(line) for line in (tmp_path / "run" / "training_log.jsonl").open()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]

"""Resumable training runs: the state ``analysis.train_bundled`` saves while it trains, and its reload.

This module owns ``checkpoint.pt`` in a run's unfinished output folder (``<out>.partial``): the model,
the patch heads, the optimizer and learning-rate schedule, the training stream's position, the logs so
far and the seconds spent, written atomically every ``--checkpoint-every`` steps and once after the
vision warm-up. A run started again with the same settings continues from it and ends with the same
weights as a run never interrupted (the training stream is indexed by scene, and nothing else draws
random numbers after the model is built); a run with other settings starts afresh. The finished folder
holds no checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

FILE = "checkpoint.pt"


@dataclass
class TrainingState:
    """Where a run stands: ``step`` training steps done (0: the vision warm-up just ended)."""

    settings: str
    step: int
    stream_index: int
    elapsed: float
    model: dict
    heads: dict
    optimizer: dict | None = None
    schedule: dict | None = None
    log: list = field(default_factory=list)
    warmup_log: list = field(default_factory=list)
    rng: torch.Tensor | None = None


def settings_key(config) -> str:
    """The settings a checkpoint must share with the run that resumes it, as canonical JSON."""
    values = asdict(config)
    values["scene"] = config.scene.to_dict()
    return json.dumps(values, sort_keys=True, default=str)


def save(folder: Path, state: TrainingState) -> None:
    """Write ``state`` to ``folder/checkpoint.pt`` through a temporary file, so a run killed while
    saving keeps its previous checkpoint."""
    path = Path(folder) / FILE
    partial = path.with_name(FILE + ".tmp")
    torch.save(asdict(state), partial)
    partial.replace(path)


def load(folder: Path, config) -> TrainingState | None:
    """The checkpoint in ``folder`` when it was saved by a run with ``config``'s settings, else None."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    try:
        state = TrainingState(**torch.load(path, weights_only=False))
    except Exception:  # a checkpoint from another version of this module, or a damaged one: start afresh
        return None
    return state if state.settings == settings_key(config) else None


def discard(folder: Path) -> None:
    """Remove the checkpoint (the run finished: its folder becomes the output)."""
    for name in (FILE, FILE + ".tmp"):
        (Path(folder) / name).unlink(missing_ok=True)

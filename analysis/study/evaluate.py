"""Greedy evaluation of a VLM on a benchmark split, per question family.

This module owns greedy answering (``answer``) and the per-family accuracy table. It is the evaluation the
bundled model's card reports; ``python -m analysis.evaluate`` runs it, and again with every image
replaced by the blank image of the model's scene config (the check that the model actually uses the
picture); a split generated with another scene config than the model's is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis import paths
from analysis.benchmark.datasets import DatasetError, Sample, load_split
from analysis.benchmark.scene_config import DEFAULT, SceneConfig
from analysis.measure.consistency import normalize_answer
from analysis.study.models import (  # noqa: F401  (re-exported)
    ModelError,
    batch_inputs,
    check_model,
    evaluation_scene,
    load_model,
)


@torch.no_grad()
def greedy_answers(model, processor, inputs, max_new_tokens: int = 4) -> list[str]:
    """Greedy-decoded text of the new tokens, for one batch of model inputs."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def answer(model, processor, samples: Sequence[Sample], batch_size: int = 32, blank: bool = False,
           max_new_tokens: int = 4, progress: bool = True, scene: SceneConfig = DEFAULT) -> list[str]:
    """Greedy-decoded answers, decoded text of the new tokens only (``blank``: to the blank image of
    ``scene``, the model's scene config, ``evaluation_scene``)."""
    answers: list[str] = []
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(samples), batch_size), desc="answering", disable=not progress):
        inputs = batch_inputs(processor, samples[start:start + batch_size], blank, scene).to(device)
        answers += greedy_answers(model, processor, inputs, max_new_tokens)
    return answers


def accuracy_table(samples: Sequence[Sample], answers: Sequence[str]) -> pd.DataFrame:
    """Rows per family and ``overall``; columns ``n`` and ``accuracy`` (percent)."""
    frame = pd.DataFrame({"family": [s.family for s in samples],
                          "correct": [normalize_answer(a) == normalize_answer(s.answer)
                                      for s, a in zip(samples, answers)]})
    table = frame.groupby("family")["correct"].agg(n="size", accuracy="mean")
    table.loc["overall"] = [len(frame), frame["correct"].mean()]
    table["n"] = table["n"].astype(int)
    table["accuracy"] = 100 * table["accuracy"]
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(paths.BUNDLED_MODEL))
    parser.add_argument("--dataset", default="test")
    parser.add_argument("--limit", type=int, default=0, help="first N questions (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write both tables here")
    args = parser.parse_args(argv)
    if args.limit < 0:
        parser.error("--limit must be >= 0 (0: the whole split)")
    try:
        scene = evaluation_scene(args.model, args.dataset)
        samples = load_split(args.dataset, limit=args.limit or None)
        model, processor = load_model(args.model)
    except (ModelError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tables = {}
    for blank in (False, True):
        tables["blank" if blank else "image"] = accuracy_table(
            samples, answer(model, processor, samples, args.batch_size, blank=blank, scene=scene))
    both = pd.concat({"with image": tables["image"]["accuracy"], "blank image": tables["blank"]["accuracy"],
                      "n": tables["image"]["n"]}, axis=1)
    both["drop"] = both["with image"] - both["blank image"]
    print(both.round(1).to_markdown() if _has_tabulate() else both.round(1).to_string())
    if args.json:
        args.json.write_text(json.dumps({k: v.round(2).reset_index().to_dict("records")
                                         for k, v in tables.items()}, indent=1))
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()

"""What choices on LVPruning's own schedule can achieve: trained modules vs random and ground truth.

    python -m benchmarks.lvpruning_schedule [--limit 0] [--rho 0.5] [--path FOLDER] [--seeds 1] [--drop-asked]

Every row keeps the same visual tokens per stage as LVPruning at ``rho`` (stages at its trained layers,
ratios [rho, rho-0.2, rho-0.4]) through the same ``lofi`` runtime; only the choice differs:

* ``lvpruning``: the trained decision modules (``--path``, default the bundled model's), top-k as in
  the paper;
* ``lvpruning-sample``: the same modules with ``selection="sample"`` (tokens drawn with weights = keep
  odds instead of the top-k; not in the paper);
* ``schedule-random``: uniformly random choices (seeded per sample);
* ``schedule-objects``: patches under any object first (ground truth, ``analysis.shapes.patch_labels``),
  random among equals;
* ``schedule-asked``: patches under the objects the question names first, then other objects;
* ``schedule-lofi``: LoFi's leverage scores of the present visual tokens at each stage (training-free;
  a token's leverage depends on all the others, a decision module scores each token on its own).

The ground-truth rows show what keeping the right patches gives on this schedule (not a strict bound
on what a module could choose); their FLOPs equal LVPruning's with free decisions. Accuracy and flip rate
(against the unpruned model's greedy answers on the same questions) in %, with the flips per question
family. ``kept_cosine`` and ``kept_spread``: of the tokens kept after the last stage, the mean pairwise
cosine of their language-model input features (redundancy) and their mean pairwise distance in patches
(spatial spread).

``--seeds N`` reruns the seeded choices (``lvpruning-sample`` and the ``schedule-`` rows but ``lofi``) with
seeds 1 .. N-1 and prints their flip rate per seed, with mean, min and max.

``--drop-asked`` instead asks where colour answers are read: one question at a time, it drops from
layer L on only the patches under the asked object and their 8 neighbours (or as many random
background patches) and counts the colour answers that change.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import lofi
from analysis import paths
from analysis.benchmark import datasets, shapes
from analysis.measure.consistency import normalize_answer
from analysis.study.evaluate import batch_inputs, greedy_answers, load_model
from lofi.methods.leverage import LoFi
from lofi.methods.lvpruning import LVPruning
from lofi.registry import PruningMethod, StageInput

RULES = ("random", "objects", "asked", "lofi")


def priorities(sample: datasets.Sample, rule: str, grid: int, config: shapes.SceneConfig = shapes.DEFAULT
               ) -> torch.Tensor:
    """Per visual token: 1 under an object (``asked``: 2 under the objects the question names), 0
    elsewhere; all 0 for ``random`` and ``lofi``. ``config``: the scene config of the sample's split."""
    if rule in ("random", "lofi"):
        return torch.zeros(grid * grid)
    objects = [shapes.ShapeObject(**o) for o in sample.extra["objects"]]
    labels = shapes.patch_labels(objects, grid, config)
    words = set(sample.question.lower().rstrip("?").split())
    named = {i for i, o in enumerate(objects)
             if o.colour in words or o.shape in words or config.shapes[o.shape] in words}
    out = np.zeros(grid * grid)
    for i, o in enumerate(objects):
        under = (labels["colour"] == list(config.colours).index(o.colour) + 1) & \
                (labels["shape"] == list(config.shapes).index(o.shape) + 1)
        out[under] = 2 if rule == "asked" and i in named else 1
    return torch.tensor(out)


class ScheduleChoice(PruningMethod):
    """LVPruning's layers and per-stage counts; tokens chosen by ``priority`` (set per batch), ties at random."""

    name = "schedule"

    @property
    def draws(self) -> bool:  # type: ignore[override]
        return self.leverage is None  # the tie-breaking draw (StageInput.uniform)

    def __init__(self, schedule: LVPruning, layers: list[int], rule: str = "random", seed: int = 0):
        super().__init__(schedule.keep)
        self.schedule, self.layers, self.rule, self.seed = schedule, layers, rule, seed
        self.leverage = LoFi() if rule == "lofi" else None
        self.priority: torch.Tensor | None = None  # [batch, n_visual], per original visual index

    def stages(self, num_layers: int) -> list[int]:
        return list(self.layers)

    def n_keep(self, stage: int, n_visual: torch.Tensor, n_present: torch.Tensor) -> torch.Tensor:
        return self.schedule.n_keep(stage, n_visual, n_present)

    def scores(self, state: StageInput) -> torch.Tensor:
        if self.leverage is not None:
            return self.leverage.scores(state)
        priority = self.priority.to(state.visual_index.device).gather(1, state.visual_index.clamp_min(0))
        return priority + 0.5 * state.uniform(self.seed)  # a tie-breaking draw below one priority step


@torch.no_grad()
def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[batch, n_visual, d] float: the language model's visual input features."""
    features = model.get_image_features(pixel_values=pixel_values)
    features = getattr(features, "pooler_output", features)
    features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
    return features.reshape(len(pixel_values), -1, features.shape[-1]).float()


def kept_set_stats(features: torch.Tensor, kept: torch.Tensor) -> list[tuple[float, float]]:
    """Per sample, of the tokens kept after the last stage: the mean pairwise cosine of their language-model
    input features (how redundant they are) and their mean pairwise distance on the patch grid."""
    side = int(features.shape[1] ** 0.5)
    cells = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1)
    cells = cells.reshape(-1, 2).float()
    out = []
    for row, index in enumerate(kept.cpu()):
        n = len(index)
        if n < 2:
            out.append((float("nan"), float("nan")))
            continue
        unit = torch.nn.functional.normalize(features[row, index.to(features.device)], dim=-1)
        cosine = ((unit @ unit.T).sum() - n) / (n * (n - 1))
        distance = torch.cdist(cells[index], cells[index]).sum() / (n * (n - 1))
        out.append((cosine.item(), distance.item()))
    return out


def answer_batch(model, processor, inputs, method: PruningMethod | None = None):
    """Normalised greedy answers for one batch, unpruned or under ``method``, and the pruning handle."""
    if method is None:
        return [normalize_answer(a) for a in greedy_answers(model, processor, inputs)], None
    with lofi.pruned(model, method) as handle:
        given = greedy_answers(model, processor, inputs)
    return [normalize_answer(a) for a in given], handle


def compare_choices(model, processor, samples, choices: dict[str, PruningMethod], batch_size: int = 50):
    """Answers of the unpruned model (``"baseline"``) and of every choice, and each choice's
    ``kept_set_stats``; each batch's images are loaded and encoded once for all of them."""
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    answers = {"baseline": [], **{name: [] for name in choices}}
    stats = {name: [] for name in choices}
    for start in tqdm(range(0, len(samples), batch_size), desc="batches"):
        chunk = samples[start:start + batch_size]
        inputs = batch_inputs(processor, chunk)
        features = image_features(model, inputs["pixel_values"])
        answers["baseline"] += answer_batch(model, processor, inputs)[0]
        for name, method in choices.items():
            if isinstance(method, ScheduleChoice):
                method.priority = torch.stack([priorities(s, method.rule, grid).float() for s in chunk])
            given, handle = answer_batch(model, processor, inputs, method)
            answers[name] += given
            stats[name] += kept_set_stats(features, handle.kept[-1].clamp_min(0))
    return answers, stats


class DropSet(PruningMethod):
    """Drops the visual tokens ``drop`` (indices into the image's tokens) at ``layer``; batch of one."""

    name = "drop-set"

    def __init__(self, layer: int, drop: torch.Tensor):
        super().__init__(1.0, layer)
        self.drop = drop

    def n_keep(self, stage: int, n_visual: torch.Tensor, n_present: torch.Tensor) -> torch.Tensor:
        return n_present - len(self.drop)

    def scores(self, state: StageInput) -> torch.Tensor:
        return (~torch.isin(state.visual_index, self.drop.to(state.visual_index.device))).float()


def drop_asked(model, processor, samples, layers=(0, 1, 2, 4, 6), seed=0) -> pd.DataFrame:
    """Colour answers changed by dropping the asked object's patches (and neighbours) vs random background."""
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    colour = [s for s in samples if s.family == "colour"]
    inputs = [batch_inputs(processor, [s]) for s in colour]
    baseline = [answer_batch(model, processor, x)[0][0] for x in inputs]
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for layer in layers:
        changed = {"asked object + neighbours": 0, "as many background patches": 0}
        for sample, sample_inputs, before in zip(colour, inputs, baseline):
            named = (priorities(sample, "asked", grid) == 2).view(1, 1, grid, grid).float()
            near = torch.nn.functional.max_pool2d(named, 3, 1, 1).view(-1) > 0
            background = ((priorities(sample, "objects", grid) == 0) & ~near).nonzero()[:, 0]
            if not near.any():
                continue
            random = background[torch.randperm(len(background), generator=generator)[:int(near.sum())]]
            for name, drop in (("asked object + neighbours", near.nonzero()[:, 0]),
                               ("as many background patches", random)):
                changed[name] += answer_batch(model, processor, sample_inputs, DropSet(layer, drop))[0][0] != before
        rows.append({"from layer": layer, **changed})
    print(f"colour answers changed (of {len(colour)}) when only these patches are dropped:")
    return pd.DataFrame(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--limit", type=int, default=0, help="first N test questions (0: all 1,200)")
    parser.add_argument("--path", type=Path, help="decision modules (default: the bundled model's)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds of the seeded choices (0 .. N-1)")
    parser.add_argument("--drop-asked", action="store_true",
                        help="instead: colour answers changed by dropping only the asked object's patches")
    args = parser.parse_args(argv)
    model, processor = load_model(paths.BUNDLED_MODEL)
    samples = datasets.load_split("test", limit=args.limit or None)
    if args.drop_asked:
        print(drop_asked(model, processor, samples).to_markdown(index=False))
        return
    lvpruning = LVPruning(keep=args.rho, path=args.path)
    lvpruning.bind(model)
    num_layers = model.config.text_config.num_hidden_layers
    layers = lvpruning.stages(num_layers)
    vision = model.config.vision_config
    n_visual = (vision.image_size // vision.patch_size) ** 2

    def seeded(seed: int) -> dict[str, PruningMethod]:
        # the same trained modules, read from disk once
        sampled = LVPruning(keep=args.rho, selection="sample", seed=seed, modules=lvpruning.modules)
        return {"lvpruning-sample": sampled, **{f"schedule-{rule}": ScheduleChoice(lvpruning, layers, rule, seed)
                                                for rule in RULES if rule != "lofi"}}

    first = seeded(0)
    choices = {"lvpruning": lvpruning, **first, "schedule-lofi": ScheduleChoice(lvpruning, layers, "lofi")}
    answers, stats = compare_choices(model, processor, samples, choices)
    baseline = answers["baseline"]
    rates = {name: [100 * np.mean([a != b for a, b in zip(answers[name], baseline)])] for name in first}
    for seed in range(1, args.seeds):
        again, _ = compare_choices(model, processor, samples, seeded(seed))
        for name, given in again.items():
            if name != "baseline":
                rates[name].append(100 * np.mean([a != b for a, b in zip(given, baseline)]))
    families = sorted({s.family for s in samples})
    table = []
    for name, given in answers.items():
        flips = [a != b for a, b in zip(given, baseline)]
        row = {"choice": name, "accuracy": 100 * np.mean([a == normalize_answer(s.answer)
                                                           for a, s in zip(given, samples)]),
               "flip_rate": 100 * np.mean(flips)}
        row.update({f"flips_{f}": sum(x for x, s in zip(flips, samples) if s.family == f) for f in families})
        kept = np.array(stats.get(name, [(np.nan, np.nan)]))
        row.update(kept_cosine=np.nanmean(kept[:, 0]), kept_spread=np.nanmean(kept[:, 1]))
        table.append(row)
    table = pd.DataFrame(table)
    kept = [n for _, n in lvpruning.schedule(num_layers, n_visual)]
    print(f"rho = {args.rho}: stages at layers {layers} keep {kept} of {n_visual} visual tokens; "
          f"{len(samples)} test questions")
    table = table.round({"accuracy": 1, "flip_rate": 1, "kept_cosine": 3, "kept_spread": 2})
    kept_columns = ["kept_cosine", "kept_spread"]
    table[kept_columns] = table[kept_columns].astype(object).where(table[kept_columns].notna(), "-")
    print(table.to_markdown(index=False, floatfmt="g"))
    if args.seeds > 1:
        spread = pd.DataFrame([{"choice": name, **{f"seed{i}": r for i, r in enumerate(values)},
                                "mean": np.mean(values), "min": min(values), "max": max(values)}
                               for name, values in rates.items()])
        print(f"\nflip rate (%) of the seeded choices over seeds 0 .. {args.seeds - 1}")
        print(spread.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()

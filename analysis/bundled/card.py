"""Write ``data/shapes-llava/README.md``, the bundled model's card, from measured results.

    python -m analysis.model_card          # evaluates on the full test split (real and blank images)
    python -m analysis.model_card --model FOLDER --dataset SPLIT   # another model, on a split of its scenes

The card (``templates/card.md.j2``) states the architecture (read from the saved config), the scene config
the model was trained on (``scene_description``; the evaluation split must record the same one), the training
commands and summary (``training_summary.json``, a ``TrainingSummary``), the loss curve, and the
per-family accuracy tables with real and with blank images: all of it generated. The notes of what was
tried and what the probes found are hand-written in ``FINDINGS.md`` beside the card, which the card
includes verbatim under its own heading.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jinja2
import pandas as pd

from analysis.benchmark import shapes
from analysis.benchmark.datasets import DatasetError, load_split
from analysis.benchmark.scene_config import DEFAULT, SceneConfig
from analysis.bundled import recipe as bundled
from analysis.bundled.train import TrainingSummary
from analysis.study.evaluate import accuracy_table, answer, evaluation_scene, load_model
from analysis.study.models import SCENE_RECORD, ModelError


def _size(path: Path) -> str:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return f"{total / 2**20:.1f} MiB"


def command(summary: TrainingSummary, model_dir: str = "data/shapes-llava") -> str:
    """The ``analysis.train_bundled`` command line that a training summary records."""
    parts = ["python -m analysis.train_bundled"]
    if summary.init_from:
        parts += [f"--init-from {model_dir}", f"--start {summary.start}"]
    scene = summary.scene_config()
    options = shapes.scene_arguments(scene)
    parts += options if options is not None else [f"--scene-config {model_dir}/{SCENE_RECORD}"]
    parts += [f"--steps {summary.steps}", f"--batch-size {summary.batch_size}", f"--turns {summary.turns}",
              f"--curriculum {summary.curriculum}"]
    if summary.curriculum_start != scene.min_objects:
        parts.append(f"--curriculum-start {summary.curriculum_start}")
    if not summary.init_from:  # architecture flags only shape a model built from scratch
        parts.append(f"--text-init {summary.text_init}")
    parts.append(f"--image-norm {summary.image_norm}")
    parts.append("--nearest-targets" if summary.nearest_targets else "--no-nearest-targets")
    parts.append(f"--vision-warmup {summary.vision_warmup or 0}")
    if summary.family_weights:
        changed = ",".join(f"{k}={v:g}" for k, v in summary.family_weights.items() if v != 1)
        parts.append(f"--family-weights {changed or 'existence=1'}")
    if summary.lookup_weight:
        parts.append(f"--lookup-weight {summary.lookup_weight:g} --lookup-layer {summary.lookup_layer}"
                     + (" --count-lookup" if summary.count_lookup else ""))
    if not summary.describe:
        parts.append("--no-describe")
    parts += [f"--lr {summary.lr}", f"--seed {summary.seed}"]
    if summary.bf16:
        parts.append("--bf16")
    return " ".join(parts)


def _continuation(number: int, stage: TrainingSummary) -> str:
    weights = stage.family_weights or {}
    mix = (" Question families are drawn with weights " + ", ".join(f"{k} {v:g}" for k, v in weights.items())
           + "." if weights else "")
    first = stage.curriculum_start
    restart = (f" The curriculum restarts: at most {first} object{'s' if first > 1 else ''} per scene, "
               f"growing to {stage.scene_config().max_objects} over {stage.curriculum} steps." if stage.curriculum
               else "")
    return (f"Stage {number}: {stage.steps} more steps on fresh scenes (the stream from scene {stage.start:,}), "
            f"lr {stage.lr} with a new warm-up and cosine, fresh patch heads (weight {stage.aux_weight})."
            f"{mix}{restart}"
            + (" Matmuls in bfloat16 autocast (weights and optimizer in float32)." if stage.bf16 else ""))


def scene_description(scene: SceneConfig) -> str:
    """The scene config as the card states it, in words (every field)."""
    sizes = ", ".join(f"{name} {side} px" for name, side in scene.sizes.items())
    where = (" This is the default config, that of the bundled splits (`data/shapes/`)." if scene == DEFAULT else
             f" This is not the default config: it is recorded in `{SCENE_RECORD}` beside the weights, and "
             "evaluation refuses a split that records another.")
    placement = (f"each object centred in its own cell of the image's {scene.grid} x {scene.grid} grid of "
                 f"{scene.cell} px cells"
                 if scene.grid else f"boxes at least {scene.object_gap} px apart")
    asked = []
    if "spatial" in scene.families:
        asked.append(f"spatial ones only about centres at least {scene.min_separation} px apart along the asked axis")
    if "position" in scene.families:
        asked.append(f"position ones (which half of the image) only about centres at least "
                     f"{scene.min_separation / 2:g} px from the middle line")
    return (f"{scene.image_size}x{scene.image_size} px images on an RGB {tuple(scene.background)} background, "
            f"{scene.min_objects} to {scene.max_objects} objects per scene (bounding boxes {sizes}; {placement}), "
            f"{len(scene.colours)} colours ({', '.join(scene.colours)}) x {len(scene.shapes)} shapes "
            f"({', '.join(scene.shapes)}); question families {', '.join(scene.families)}"
            + "".join(f"; {text}" for text in asked) + f".{where}")


def evaluation_table(model, processor, samples, scene: SceneConfig = DEFAULT) -> pd.DataFrame:
    """Per-family accuracy (%) with real and with blank images (``scene``'s, the model's scene config), and the
    drop between them."""
    image = accuracy_table(samples, answer(model, processor, samples))
    blank = accuracy_table(samples, answer(model, processor, samples, blank=True, scene=scene))
    table = pd.DataFrame({"questions": image["n"], "accuracy, real images (%)": image["accuracy"],
                          "accuracy, blank images (%)": blank["accuracy"]})
    table["drop (points)"] = table.iloc[:, 1] - table.iloc[:, 2]
    return table


def quality_status(table: pd.DataFrame) -> str:
    """The card's first line: whether the bundled model meets its quality bar (``recipe.QUALITY_BAR``),
    measured."""
    bar = bundled.QUALITY_BAR
    overall, existence = table.loc["overall"].iloc[1], table.loc["existence"].iloc[1]
    drop = table.loc["overall", "drop (points)"]
    families = table.drop(index="overall")
    target = (f">= {bar['overall']:g}% overall, >= {bar['existence']:g}% on existence, >= {bar['family']:g}% on "
              f"every family, >= {bar['blank_drop']:g} points lost on blank images")
    if (overall >= bar["overall"] and existence >= bar["existence"] and drop >= bar["blank_drop"]
            and families.iloc[:, 1].min() >= bar["family"]):
        blind = [f for f in families.index if families.loc[f, "drop (points)"] < 5]
        return (f"**Quality bar met** ({target})."
                + "".join(f" {f.capitalize()} questions are still answered without the image "
                          f"({families.loc[f].iloc[1]:.1f}% with images, {families.loc[f].iloc[2]:.1f}% blank)."
                          for f in blind))
    weakest = families.iloc[:, 1].sort_values().index[:2]
    return (f"**Quality bar NOT met** ({target}): this checkpoint reaches {overall:.1f}% overall, "
            f"{existence:.1f}% on existence, {families.iloc[:, 1].min():.1f}% on its weakest family and a "
            f"{drop:.1f}-point drop. Weakest families: "
            + ", ".join(f"{f} ({families.loc[f].iloc[1]:.1f}% with images, {families.loc[f].iloc[2]:.1f}% blank)"
                        for f in weakest) + ". Treat its pruning results as a working pipeline, not findings.")


def write_card(model_dir: Path, split: str | Path = "test") -> Path:
    """The card of the model in ``model_dir``, evaluated on ``split`` (``ModelError`` when the split records
    another scene config than the model's)."""
    scene = evaluation_scene(model_dir, split)
    samples = load_split(split)
    model, processor = load_model(model_dir)
    table = evaluation_table(model, processor, samples, scene)
    (model_dir / "evaluation.json").write_text(json.dumps(table.round(2).reset_index().to_dict("records"), indent=1))
    summary = TrainingSummary.from_dict(json.loads((model_dir / "training_summary.json").read_text()))
    chain = summary.chain()
    first = chain[0]
    vision = model.config.vision_config
    findings = model_dir / "FINDINGS.md"
    environment = jinja2.Environment(loader=jinja2.PackageLoader("analysis.bundled", "templates"),
                                     undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    card = environment.get_template("card.md.j2").render(
        status=quality_status(table), vision=vision, text=model.config.text_config,
        feature_layer=model.config.vision_feature_layer, n_visual=(vision.image_size // vision.patch_size) ** 2,
        vocabulary=len(processor.tokenizer), parameters=sum(p.numel() for p in model.parameters()),
        weights_mib=(model_dir / "model.safetensors").stat().st_size / 2**20, chain=chain, first=first,
        commands=[command(stage) for stage in chain],
        warmup=(f" First, {first.vision_warmup} steps train the vision tower and projector alone on the patch heads "
                f"below (shape loss on object patches only; final head loss {first.vision_warmup_final_aux}), then "
                "the whole model trains." if first.vision_warmup else ""),
        recipe=(f" Curriculum: the most objects per training scene grows from {first.curriculum_start} to "
                f"{scene.max_objects} over the first {first.curriculum} steps." if first.curriculum else ""),
        scene=scene_description(scene),
        nearest=("; and of the *nearest* object its colour-shape pair, centre cell and shape count, plus the "
                 "scene's object count" if first.nearest_targets else " (patch-local targets only)"),
        describe_order="in reading order (row by row, the order of the visual tokens)" if scene.grid
        else "left to right",
        lookup=(f" Lookup supervision (weight {first.lookup_weight:g}): at each answer position, head 0 of "
                f"language-model layer {first.lookup_layer} is taught to put its attention on the visual tokens of "
                "the objects the question is about (`shapes.referents`; loss -log of that attention's sum; count "
                "questions excepted" + (", whose answers teach the next head even attention over `<s>` and the "
                                        "counted objects" if first.count_lookup else "") + "). The "
                "language model then finds an object from its own token instead of a summary spread over all of "
                "them." if first.lookup_weight else ""),
        later=[_continuation(k + 2, stage) for k, stage in enumerate(chain[1:])], summary=summary,
        stage_steps=" + ".join(f"{stage.steps:,}" for stage in chain),
        wall="; ".join(f"stage {k + 1}: {stage.wall_seconds / 60:.1f} min" for k, stage in enumerate(chain)),
        n_questions=len(samples), n_images=len({s.image for s in samples}), table=table.round(1).to_markdown(),
        data_size=_size(model_dir.parent),
        findings=findings.read_text().split("\n\n", 2)[2].strip() + "\n" if findings.is_file() else "")
    (model_dir / "README.md").write_text(card)
    return model_dir / "README.md"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m analysis.model_card", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=bundled.BUNDLED_MODEL)
    parser.add_argument("--dataset", default="test", help="the split to evaluate on: test, val, or a JSONL split of "
                                                          "the model's scene config")
    args = parser.parse_args(argv)
    try:
        card = write_card(args.model, args.dataset)
    except (ModelError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(card.read_text())
    return 0


if __name__ == "__main__":
    main()

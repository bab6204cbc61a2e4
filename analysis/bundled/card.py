"""Write ``data/shapes-llava/README.md``, the bundled model's card, from measured results.

    python -m analysis.model_card          # evaluates on the full test split (real and blank images)

The card states the architecture (read from the saved config), the training command and summary
(``training_summary.json``), the loss curve, and the per-family accuracy tables with real and with
blank images. Nothing in it is typed by hand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from analysis.benchmark.datasets import load_split
from analysis.bundled import recipe as bundled
from analysis.study.evaluate import accuracy_table, answer, load_model


def _size(path: Path) -> str:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return f"{total / 2**20:.1f} MiB"


def stages(summary: dict) -> list[dict]:
    """The chain of training runs behind a checkpoint, oldest first (``--init-from`` links them)."""
    chain = [summary]
    while chain[0].get("previous"):
        chain.insert(0, chain[0]["previous"])
    return chain


def command(summary: dict, model_dir: str = "data/shapes-llava") -> str:
    """The ``analysis.train_bundled`` command line that a training summary records."""
    parts = ["python -m analysis.train_bundled"]
    if summary.get("init_from"):
        parts += [f"--init-from {model_dir}", f"--start {summary.get('start', 0)}"]
    parts += [f"--steps {summary['steps']}", f"--batch-size {summary['batch_size']}",
              f"--turns {summary['turns']}", f"--curriculum {summary.get('curriculum', 0)}"]
    if summary.get("curriculum_start", 1) != 1:
        parts.append(f"--curriculum-start {summary['curriculum_start']}")
    if not summary.get("init_from"):  # architecture flags only shape a model built from scratch
        parts.append(f"--text-init {summary.get('text_init', 0.02)}")
    parts.append(f"--image-norm {summary.get('image_norm', 'clip')}")
    parts.append("--nearest-targets" if summary.get("nearest_targets") else "--no-nearest-targets")
    parts.append(f"--vision-warmup {summary.get('vision_warmup') or 0}")
    if summary.get("family_weights"):
        changed = ",".join(f"{k}={v:g}" for k, v in summary["family_weights"].items() if v != 1)
        parts.append(f"--family-weights {changed or 'existence=1'}")
    if not summary.get("describe", True):
        parts.append("--no-describe")
    parts += [f"--lr {summary['lr']}", f"--seed {summary['seed']}"]
    if summary.get("bf16"):
        parts.append("--bf16")
    return " ".join(parts)


def _continuation(number: int, stage: dict) -> str:
    weights = stage.get("family_weights") or {}
    mix = (" Question families are drawn with weights " + ", ".join(f"{k} {v:g}" for k, v in weights.items())
           + "." if weights else "")
    first = stage.get("curriculum_start", 1)
    restart = (f" The curriculum restarts: at most {first} object{'s' if first > 1 else ''} per scene, "
               f"growing to 6 over {stage['curriculum']} steps."
               if stage.get("curriculum") else "")
    return (f"\n\nStage {number}: {stage['steps']} more steps on fresh scenes (the stream from scene "
            f"{stage.get('start', 0):,}), lr {stage['lr']} with a new warm-up and cosine, fresh patch heads "
            f"(weight {stage.get('aux_weight', 0)}).{mix}{restart}"
            + (" Matmuls in bfloat16 autocast (weights and optimizer in float32)." if stage.get("bf16") else ""))


def write_card(model_dir: Path, split: str = "test") -> Path:
    model, processor = load_model(model_dir)
    samples = load_split(split)
    image = accuracy_table(samples, answer(model, processor, samples))
    blank = accuracy_table(samples, answer(model, processor, samples, blank=True))
    table = pd.DataFrame({"questions": image["n"], "accuracy, real images (%)": image["accuracy"],
                          "accuracy, blank images (%)": blank["accuracy"]})
    table["drop (points)"] = table.iloc[:, 1] - table.iloc[:, 2]
    (model_dir / "evaluation.json").write_text(json.dumps(table.round(2).reset_index().to_dict("records"), indent=1))
    summary = json.loads((model_dir / "training_summary.json").read_text())
    config = model.config
    text, vision = config.text_config, config.vision_config
    n_visual = (vision.image_size // vision.patch_size) ** 2
    params = sum(p.numel() for p in model.parameters())
    weights = (model_dir / "model.safetensors").stat().st_size / 2**20
    overall, existence = table.loc["overall"].iloc[1], table.loc["existence"].iloc[1]
    drop = table.loc["overall", "drop (points)"]
    met = overall >= 85 and existence >= 90 and drop >= 30
    families = table.drop(index="overall")
    weakest = families.iloc[:, 1].sort_values().index[:2]
    blind = [f for f in families.index if families.loc[f, "drop (points)"] < 5]
    caveat = ("".join(f" {f.capitalize()} questions are still answered without the image "
                      f"({families.loc[f].iloc[1]:.1f}% with images, {families.loc[f].iloc[2]:.1f}% blank)."
                      for f in blind))
    status = ("**Quality target met** (>= 85% overall, >= 90% existence, >= 30 points lost on blank images)."
              + caveat if met else
              f"**Quality target NOT met.** Issue #2 asks for >= 85% overall, >= 90% on existence and a drop of "
              f">= 30 points on blank images; this checkpoint reaches {overall:.1f}% overall, {existence:.1f}% on "
              f"existence and a {drop:.1f}-point drop. Weakest families: "
              + ", ".join(f"{f} ({families.loc[f].iloc[1]:.1f}% with images, {families.loc[f].iloc[2]:.1f}% "
                          "blank)" for f in weakest)
              + ". Treat its pruning results as a working pipeline, not findings.")
    chain = stages(summary)
    first = chain[0]
    warmup = (f" First, {first['vision_warmup']} steps train the vision tower and projector alone on the "
              f"patch heads below (shape loss on object patches only; final head loss "
              f"{first.get('vision_warmup_final_aux')}), then the whole model trains."
              if first.get("vision_warmup") else "")
    recipe = (f" Curriculum: the most objects per training scene grows from 1 to 6 over the first "
              f"{first['curriculum']} steps." if first.get("curriculum") else "")
    nearest = ("; and of the *nearest* object its colour-shape pair, centre cell and shape count, plus the "
               "scene's object count" if first.get("nearest_targets") else "")
    later = "".join(_continuation(k + 2, stage) for k, stage in enumerate(chain[1:]))
    wall = "; ".join(f"stage {k + 1}: {stage['wall_seconds'] / 60:.1f} min" for k, stage in enumerate(chain))
    card = f"""# shapes-llava: a small LLaVA trained from scratch on the shapes benchmark

{status}

The default model of this toolkit: a `LlavaForConditionalGeneration` that loads offline exactly like a
llava-hf checkpoint (`LlavaForConditionalGeneration.from_pretrained("data/shapes-llava")`,
`AutoProcessor.from_pretrained("data/shapes-llava")`), with the LLaVA-1.5 prompt
`USER: <image>\\n{{question}} ASSISTANT:` and chat template. It exists so that pruning studies have a model
whose answers, divergences and spectra mean something, with no download.

## Architecture

| part | configuration |
|---|---|
| vision tower | CLIP ViT, {vision.num_hidden_layers} layers, width {vision.hidden_size}, {vision.num_attention_heads} heads, {vision.image_size}x{vision.image_size} px images, patch {vision.patch_size} -> **{n_visual} visual tokens** (CLS dropped, `vision_feature_layer={config.vision_feature_layer}`) |
| projector | 2-layer MLP with GELU ({vision.hidden_size} -> {text.hidden_size} -> {text.hidden_size}), as LLaVA-1.5 |
| language model | Llama, **{text.num_hidden_layers} decoder layers**, width {text.hidden_size}, {text.num_attention_heads} heads ({text.num_key_value_heads} KV), SwiGLU MLP {text.intermediate_size}, RoPE |
| tokenizer | word level, {len(processor.tokenizer)} tokens (the benchmark's words, `<s>`, `</s>`, `<pad>`, `<unk>`, `<image>`) |
| parameters | {params / 1e6:.2f} M; weights `model.safetensors` {weights:.1f} MiB (float32) |

## Training

{"One run" if len(chain) == 1 else f"{len(chain)} runs"} of the seeded training script{"" if len(chain) == 1 else ", each continuing from the weights of the one before (`--init-from`)"}:

```bash
{chr(10).join(command(stage) for stage in chain)}
```

{"Stage 1: f" if len(chain) > 1 else "F"}rom scratch, seeded, on the training stream of `analysis.shapes` (seeds disjoint from the test and val
splits). Each sequence is one image with up to {first['turns']} benchmark questions as a LLaVA multi-turn
conversation, the first turn token for token the evaluation prompt, plus a closing
"Describe the image." turn listing every object left to right.{warmup}{recipe} Training-only linear heads on
the visual tokens (weight {first.get('aux_weight', 0)}) predict, per patch, the colour and shape under it,
whether it holds an object's centre, and its row and column{nearest}. Loss on answer tokens plus those
heads; AdamW (lr {first['lr']}, cosine, warm-up, weight decay 0.05), gradient clipping 1.0; image
normalisation: {first.get('image_norm', 'clip')}; language-model initial std {first.get('text_init', 0.02)}.{later}

What was tried on this 2-core CPU (no GPU was lent), all seeded, val accuracy in brackets:
4 questions per image, width 256, lr 1e-3 (45% at step 250, 41% at 500); plus the describe turn,
width 192 (48% at 450 and 600); plus the patch heads (42% at 300, 41% at 450); patch words predicted
through the LM's embedding matrix (35% at 300); the same at lr 2e-3, batch 16, 700 steps (45% at 300,
46% at 700; 44.7% on test: the checkpoint shipped before this one).

What the probes found, for the next run (`analysis.train_bundled` has each as an option):

1. **The language model's initial std.** Llama's 0.02 (made for widths near 4096) left this 192-wide
   model unable to read even a *single* object's colour after 200 steps of one-object scenes (21%,
   chance 17%); with `--text-init 0.07` (about 1/sqrt(width)) it read it in 100% of cases after 150 steps.
2. **Image normalisation.** With CLIP's statistics the constant background dominates every patch
   embedding: a linear probe of patch row and column stayed at chance for 200 steps; with
   `--image-norm background` (empty patches enter as zeros) it was learnt in 40.
3. **Shape is the vision tower's bottleneck.** Measured on object patches only (the per-patch loss hides
   it: 95% of patches are background), the tower's shape probe reached 45-57% (chance 25%) after 150
   steps of one-object scenes, with CLIP's initial scales, 5x larger embeddings, 3x larger weights, or
   a shape loss on object patches only; a patch inside an object shows no shape, so the tower must
   combine the edges of 2-9 patches. With 1 and 2 above, a run with 8 questions per image,
   `--curriculum 500 --nearest-targets` reached 53% val at step 600 (colour 65%, count 58%, shape 30%)
   and 48% at step 900 (shape 24%), and was stopped: shape, and with it existence, stayed at chance.
4. **A vision warm-up fixes shape.** Trained alone on the patch heads (about 7x cheaper per step than
   the whole model), with the shape loss on object patches only, the tower's object-patch shape probe
   stayed below 60% for 500 steps, then reached 84-87% by step 1000 (`--vision-warmup`).
5. **Yes/no questions need their own easy scenes.** After the 1,000 steps above, existence and spatial
   were answered with a constant: the yes-minus-no logit margin averaged -0.09 on positives and -0.10
   on negatives (AUC 0.53). 200 more steps with those families weighted 3x on full scenes did not move
   them. 150 steps of existence questions alone on one-object scenes did: training loss 0.16 -> 0.02,
   and val existence 81% on the full multi-object scenes. Stage 2 replays the curriculum with yes/no
   questions weighted up (`--family-weights`).
6. **Spatial relations are not learnt yet.** From the stage-2 weights, 150 steps of spatial questions
   alone on scenes of at most two objects left the loss at chance (0.34, half of ln 2 per answer token
   with its end token).
7. **Colour questions fail at binding, not perception.** On the test split colour is answered right on
   all 44 one-object scenes and on 40-56% of scenes with 2-6 objects, with errors spread over many
   colour pairs. A linear probe on the language model's visual inputs (object patches of 400 training
   scenes, 20% held out) reads the patch's colour at 100% and its shape at 99.6%: the language model
   does not find the object its question names by shape, though it finds one named by colour (shape
   questions: 99.6%). 150 steps of colour questions alone on two-object scenes raised colour to 63.4%
   (2-6 objects: 50-63%) and dropped count to 62.5%: learnable, slowly, and it needs the other
   families beside it.
8. **Long stages learn binding.** Stages 4 and 5 keep every family in, weight those that must find an
   object by its shape up, and restart the curriculum at 3 objects (`--bf16`: about 1 s per step).
   Val colour stayed at 62-68% for the first 800 steps of stage 4, then rose as the learning rate fell:
   after stage 4 the test split read 81.8% overall (colour 81.5%, existence 95.3%, count 78.6%,
   spatial 47.4%). Stage 5 weights colour and count 3x: val colour reached 98% by its step 600, and
   the test split 87.6% overall after it (the table below). Spatial questions stayed at chance in
   both stages (test 47.4% and 50.2%; probe 6).

- steps: {summary.get('total_steps', summary['steps']):,} ({" + ".join(f"{stage['steps']:,}" for stage in chain)}{" in stages" if len(chain) > 1 else ""}) x {summary['batch_size']} images, after the vision warm-up
- wall time: **{summary.get('total_wall_seconds', summary['wall_seconds']) / 60:.1f} min** on {summary['threads']} CPU threads (no GPU was available){f" ({wall})" if len(chain) > 1 else ""}
- final training loss: {summary['final_loss']:.4f}

![loss curve](loss_curve.png)

## Accuracy on the test split (greedy decoding)

{len(samples)} questions over {len({s.image for s in samples})} images. "Blank images" replaces every image by the empty
background: the drop shows how much the answers depend on the picture.

{table.round(1).to_markdown()}

Reproduce with `python -m analysis.model_card` (writes this file and `evaluation.json`).
Size of `data/` at the time of writing: {_size(model_dir.parent)}.
"""
    (model_dir / "README.md").write_text(card)
    return model_dir / "README.md"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m analysis.model_card", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=bundled.BUNDLED_MODEL)
    args = parser.parse_args(argv)
    print(write_card(args.model).read_text())


if __name__ == "__main__":
    main()

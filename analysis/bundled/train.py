"""Train the bundled shapes LLaVA from scratch: ``python -m analysis.train_bundled``.

This module owns the seeded training run that produces ``data/shapes-llava``. Each training sequence
is one image of the training stream (``analysis.shapes.stream``, disjoint from the test and val
splits) with several questions about it as a LLaVA-1.5 multi-turn conversation::

    <s>USER: <image>*64 Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s> ... USER: Describe the image.
    ASSISTANT: red circle blue square ...</s>

The first turn is token for token the evaluation prompt; the loss is on the answers and their
``</s>`` only. The closing "describe" turn (``analysis.shapes.describe``, never in test/val) gives
dense supervision, training-only linear heads on the visual tokens (``PatchHeads``) give per-patch
supervision, a curriculum grows the objects per scene from ``--curriculum-start`` to the scene's most,
and a vision warm-up first trains the tower alone on the patch heads (``warm_up_vision``).

The scenes follow a ``SceneConfig`` (``TrainingConfig.scene``; the scene options of ``python -m
analysis.shapes``, or ``--scene-config FILE``; default: the bundled benchmark's). It sets the vision
tower's image size (a ``config_overrides`` image size that differs is refused), the tokenizer's words
(count answers up to ``max_objects``), the background the images are normalised around, the
curriculum's object range and the patch heads' classes. The run records it in ``scene_config.json``
beside the weights (``analysis.study.models.SCENE_RECORD``, which evaluation reads) and in
``training_summary.json``; ``--init-from`` refuses a config other than its checkpoint's (a checkpoint
without a record was trained on the first config, ``scene_config.FIRST``). Val accuracy during training
is measured on the bundled val split when it records the run's config, else on a val split of the run's
config (the same seeds and size) generated into a temporary folder for the run. Probes of the first
bundled model found what a from-scratch run needs: the vision warm-up (object shape), the language
model's initial std (``--text-init``; with Llama's 0.02 it could not read a single object's colour
after 200 steps, with 0.07 it read it perfectly after 150), and images normalised around the
background (``--image-norm background``). The shipped model adds patch-local tower targets only
(``--no-nearest-targets``) and lookup supervision (``--lookup-weight``, ``analysis.bundled.lookup``),
which taught it to find an object from its own token (val 79% at step 500 against 56% without; the card).
``--init-from`` continues a checkpoint (fresh optimizer, schedule and patch heads); the first bundled
model was five such stages with some question families weighted up (``--family-weights``). The run writes
the checkpoint (safetensors), the processor, ``training_log.jsonl`` (loss, learning rate, throughput,
periodic per-family val accuracy; a continued run prepends its checkpoint's log and numbers its steps
on) and ``loss_curve.png``. While it trains, the run keeps a checkpoint in ``<out>.partial``
(``analysis.bundled.checkpoint``, every ``--checkpoint-every`` steps): started again with the same
settings, an interrupted run resumes from it and ends with the weights an uninterrupted run ends with.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration

from analysis.benchmark import shapes
from analysis.benchmark.datasets import DatasetError
from analysis.benchmark.datasets import scene_config as split_scene_config
from analysis.benchmark.scene_config import DEFAULT, FIRST, SceneConfig, difference, record_text
from analysis.bundled import checkpoint
from analysis.bundled import recipe as bundled
from analysis.bundled.batches import ConversationBatches, curriculum_max_objects, parse_family_weights
from analysis.bundled.lookup import LookupLoss
from analysis.paths import portable
from analysis.study.evaluate import accuracy_table
from analysis.study.models import SCENE_RECORD, ModelError, scene_config


class PatchHeads(torch.nn.Module):
    """Training-only linear heads on the projector's output (the visual tokens the LM reads).

    Per visual token they predict the colour and shape of the object under the patch (or background),
    whether the patch holds an object's centre, the patch's row and column, and of the nearest object
    its colour-shape pair, centre cell and shape count, plus the scene's object count
    (``shapes.patch_labels``; the last group with ``nearest=True``). The shape loss counts object patches
    only (most patches are background, which hid an unlearnt shape). The nearest-object targets spread
    each object's identity over its neighbourhood, so a language model still attending broadly early
    in training reads it from many tokens instead of the 2-9 under the object -- and so any subset of
    the tokens carries every answer, which makes the choice of tokens matter little; the default model
    trains without them, on patch-local targets only. The heads are not saved.
    (Tried and dropped: predicting the colour and shape *words* through the LM's embedding matrix, which
    pulled the word embeddings around and lowered val accuracy.)
    """

    def __init__(self, width: int, grid: int, nearest: bool = False, scene: SceneConfig = DEFAULT):
        super().__init__()
        self.nearest = nearest
        colours, shapes_, most = len(scene.colours), len(scene.shapes), scene.max_objects
        sizes = {"colour": colours + 1, "shape": shapes_ + 1, "centre": 2, "row": grid, "col": grid}
        if nearest:  # the class counts of shapes.patch_labels' targets (counts minus 1: 0 .. most - 1)
            sizes.update(pair=colours * shapes_, shape_count=most, count=most, near_row=grid, near_col=grid)
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, n) for k, n in sizes.items()})

    def loss(self, visual: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = []
        for k, head in self.heads.items():
            logits, target = head(visual).flatten(0, 1), targets[k].flatten()
            if k == "shape":
                # on object patches only: 95% of patches are background, which hid an unlearnt shape
                on_object = target > 0
                logits, target = logits[on_object], target[on_object]
            losses.append(torch.nn.functional.cross_entropy(logits, target))
        return torch.stack(losses).mean()


def warm_up_vision(model, heads: PatchHeads, batches: "ConversationBatches", steps: int, lr: float,
                   progress: bool = True) -> list[dict]:
    """Train the vision tower and projector alone on the patch heads (no language model: ~7x cheaper).

    Why: the per-patch shape of an object needs the edges of several patches combined, and a probe
    learnt it only after ~500 steps of this objective; with the language model in the loop those
    steps cost 7x more and the LM meanwhile fits the language prior.
    """
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    parameters = [*tower.parameters(), *projector.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    schedule = warmup_cosine(optimizer, steps)
    log = []
    for step in tqdm(range(steps), desc="vision warm-up", disable=not progress):
        batch = next(batches)
        features = tower(batch["pixel_values"], output_hidden_states=True).hidden_states[
            model.config.vision_feature_layer][:, 1:]  # "default" strategy: CLS dropped
        loss = heads.loss(projector(features), batch["patch_targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        log.append({"warmup_step": step + 1, "aux_loss": round(loss.item(), 5)})
        if not progress and (step + 1) % 100 == 0:
            print(json.dumps(log[-1]), flush=True)
    return log


@torch.no_grad()
def first_token_accuracy(model, processor, split: str = "val", limit: int | None = None) -> dict[str, float]:
    """Accuracy (%) per family and ``overall`` from the argmax of the first answer token (answers are one token)."""
    from analysis.benchmark.datasets import load_split
    from analysis.study.evaluate import batch_inputs
    samples = load_split(split, limit=limit)
    answers = []
    model.eval()
    for start in range(0, len(samples), 64):
        inputs = batch_inputs(processor, samples[start:start + 64])
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        answers += processor.tokenizer.batch_decode(logits.argmax(-1, keepdim=True))
    model.train()
    return {family: round(float(a), 2) for family, a in accuracy_table(samples, answers)["accuracy"].items()}


def warmup_cosine(optimizer, total: int, warmup: int | None = None, floor: float = 0.05):
    """Linear warm-up over ``warmup`` steps (default: min(100, total // 10 + 1)), then cosine decay to
    ``floor`` x the peak learning rate by step ``total``: torch's own schedulers, stepped once per step.
    The learning rate of step s (0-based) is peak (s + 1) / warmup while warming up, then
    peak (floor + (1 - floor) (1 + cos(pi (s - warmup) / (total - warmup))) / 2)."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
    warmup = min(100, total // 10 + 1) if warmup is None else warmup
    peak = optimizer.param_groups[0]["lr"]
    return SequentialLR(optimizer, [LinearLR(optimizer, 1 / warmup, 1.0, max(1, warmup - 1)),
                                    CosineAnnealingLR(optimizer, max(1, total - warmup), floor * peak)],
                        milestones=[warmup])


@dataclass
class TrainingConfig:
    """One training run's settings (``python -m analysis.train_bundled`` flags; see ``main``)."""

    steps: int = 1000
    batch_size: int = 16
    turns: int = 8
    lr: float = 2e-3
    seed: int = 0
    eval_every: int = 300
    config_overrides: dict = field(default_factory=dict)
    describe: bool = True
    init_from: Path | None = None
    start: int = 0
    aux_weight: float = 1.0
    curriculum: int = 0
    curriculum_start: int | None = None  # None: the scene's min_objects
    nearest_targets: bool = False
    image_norm: str = "clip"
    vision_warmup: int = 0
    family_weights: dict | None = None
    bf16: bool = False
    scene: SceneConfig = DEFAULT
    checkpoint_every: int = 100  # steps; 0: no checkpoints (an interrupted run starts afresh)
    lookup_weight: float = 0.0
    lookup_layer: int | None = None  # None: half the language model's depth
    count_lookup: bool = False


class TrainingConfigError(ValueError):
    """Training settings that cannot make a run (checked before any work); the message names the fix."""


@dataclass
class TrainingSummary:
    """``training_summary.json``: the run's settings and what it measured, with the run it continued
    (``previous``) and totals over that whole chain."""

    steps: int
    batch_size: int
    turns: int
    lr: float
    seed: int
    describe: bool = True
    curriculum: int = 0
    curriculum_start: int = 1
    text_init: float = 0.02
    nearest_targets: bool = False
    image_norm: str = "clip"
    vision_warmup: int = 0
    vision_warmup_final_aux: float | None = None
    aux_weight: float = 0.0
    family_weights: dict | None = None
    bf16: bool = False
    init_from: str | None = None
    start: int = 0
    previous: TrainingSummary | None = None
    config: dict = field(default_factory=dict)
    wall_seconds: float = 0.0
    threads: int = 0
    final_loss: float = float("nan")
    parameters: int = 0
    total_steps: int = 0
    total_wall_seconds: float = 0.0
    config_overrides: dict = field(default_factory=dict)
    scene: dict | None = None  # SceneConfig.to_dict(); None: a run that predates the record (the first config)
    lookup_weight: float = 0.0
    lookup_layer: int | None = None
    count_lookup: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> TrainingSummary:
        """A summary as saved, any version (fields older runs did not record take their defaults)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("previous"):
            values["previous"] = cls.from_dict(values["previous"])
        values.setdefault("total_steps", values["steps"])
        values.setdefault("total_wall_seconds", values.get("wall_seconds", 0.0))
        return cls(**values)

    def scene_config(self) -> SceneConfig:
        """The scene config the run trained on."""
        return FIRST if self.scene is None else SceneConfig.from_dict(self.scene)

    def chain(self) -> list[TrainingSummary]:
        """The runs behind a checkpoint, oldest first (``--init-from`` links them)."""
        return ([] if self.previous is None else self.previous.chain()) + [self]

    def as_dict(self) -> dict:
        return asdict(self)


def train(out: Path, config: TrainingConfig | None = None, progress: bool = True, **settings) -> TrainingSummary:
    """Train (or, with ``init_from``, continue) the bundled model into ``out``; ``settings`` are
    ``TrainingConfig`` fields. The folder appears complete, with its log, curve and summary."""
    config = check(config or TrainingConfig(**settings))
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    model, processor = _build(config)
    vision = model.config.vision_config
    n_image_tokens = (vision.image_size // vision.patch_size) ** 2
    batches = ConversationBatches(processor, n_image_tokens, config.batch_size, config.turns, start=config.start,
                                  describe=config.describe,
                                  patch_targets=config.aux_weight > 0 or config.vision_warmup > 0,
                                  family_weights=config.family_weights, scene=config.scene,
                                  lookup=config.lookup_weight > 0,
                                  count_lookup=config.lookup_weight > 0 and config.count_lookup)
    heads = PatchHeads(model.config.text_config.hidden_size, vision.image_size // vision.patch_size,
                       config.nearest_targets, config.scene)
    tmp = out.with_name(out.name + ".partial")
    state = checkpoint.load(tmp, config) if config.checkpoint_every else None
    if state is None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    else:
        model.load_state_dict(state.model)
        heads.load_state_dict(state.heads)
        batches.index = state.stream_index
        torch.set_rng_state(state.rng)
        print(f"resuming {tmp} at step {state.step} of {config.steps} (remove the folder to start afresh)",
              file=sys.stderr)
    started = time.time() - (state.elapsed if state else 0.0)
    with tempfile.TemporaryDirectory(prefix="val-") as scratch:
        val = val_split(config.scene, Path(scratch)) if config.eval_every else None
        if state is None:
            warmup_log = (warm_up_vision(model, heads, batches, config.vision_warmup, config.lr, progress)
                          if config.vision_warmup else [])
            state = _state(config, 0, batches, started, model, heads, warmup_log=warmup_log)
            if config.checkpoint_every:
                checkpoint.save(tmp, state)
        log = _train_steps(model, processor, heads, batches, config, n_image_tokens, started, progress, val,
                           state, tmp)
    checkpoint.discard(tmp)
    summary = _save(model, processor, tmp, config, log, state.warmup_log, started)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return summary


def _state(config, step, batches, started, model, heads, optimizer=None, schedule=None, log=(), warmup_log=()
           ) -> checkpoint.TrainingState:
    return checkpoint.TrainingState(
        settings=checkpoint.settings_key(config), step=step, stream_index=batches.index,
        elapsed=time.time() - started, model=model.state_dict(), heads=heads.state_dict(),
        optimizer=None if optimizer is None else optimizer.state_dict(),
        schedule=None if schedule is None else schedule.state_dict(), log=list(log), warmup_log=list(warmup_log),
        rng=torch.get_rng_state())


def check(config: TrainingConfig) -> TrainingConfig:
    """``config`` with its defaults resolved (``curriculum_start``: the scene's ``min_objects``), or a
    ``TrainingConfigError`` line: a vision image size or checkpoint that does not fit the scene config, a
    curriculum start outside its object range."""
    scene = config.scene
    if not isinstance(scene, SceneConfig):
        raise TrainingConfigError(f"scene must be a SceneConfig, got {type(scene).__name__}")
    start = scene.min_objects if config.curriculum_start is None else config.curriculum_start
    if not scene.min_objects <= start <= scene.max_objects:
        raise TrainingConfigError(f"--curriculum-start {start} is outside the scene config's object range "
                                  f"{scene.min_objects}..{scene.max_objects}; give a count in it")
    if config.init_from is None:
        size = config.config_overrides.get("image_size", scene.image_size)
        patch = config.config_overrides.get("patch_size", bundled.patch_size(scene))
        if size != scene.image_size:
            raise TrainingConfigError(f"the vision tower's image_size {size} px differs from the scene config's "
                                      f"{scene.image_size} px images; leave image_size out (it follows the scene) "
                                      "or set the scene's --image-size")
        if scene.image_size % patch:
            raise TrainingConfigError(f"the scene config's {scene.image_size} px images are not a whole number of "
                                      f"{patch} px patches; choose an image size that is a multiple of {patch}")
    else:
        try:
            trained = scene_config(config.init_from) or FIRST
        except ModelError as e:
            raise TrainingConfigError(str(e)) from None
        if trained != scene:
            raise TrainingConfigError(
                f"--init-from {config.init_from} was trained on another scene config ({difference(trained, scene)}, "
                f"checkpoint vs this run); continue it on its own (--scene-config {config.init_from / SCENE_RECORD}, "
                "or no scene options for a checkpoint without that file) or train from scratch")
    return replace(config, curriculum_start=start, init_from=None if config.init_from is None
                   else Path(config.init_from))


def val_split(scene: SceneConfig, scratch: Path) -> str | Path:
    """The val split that training measures ``scene`` on: the bundled one when it records ``scene`` (a
    bundled split without a record is the default config's), else the val split of ``scene`` written into
    ``scratch`` (``shapes.write_split``: the val seeds, disjoint from the training stream's; its size)."""
    try:
        if (split_scene_config("val") or FIRST) == scene:
            return "val"
    except DatasetError:  # no bundled val split (or an unreadable record): the generated one serves
        pass
    return shapes.write_split(scratch, "val", config=scene)


def _build(config: TrainingConfig):
    """(model, processor) in training mode: a fresh model of the bundled architecture for the scene config,
    or ``init_from``'s weights (a fresh optimizer, schedule and patch heads follow)."""
    processor = bundled.build_processor(normalisation=config.image_norm, scene=config.scene)
    if config.init_from is not None:
        model = LlavaForConditionalGeneration.from_pretrained(config.init_from, dtype=torch.float32).train()
        if model.config.vision_config.image_size != config.scene.image_size:
            raise TrainingConfigError(f"--init-from {config.init_from} reads {model.config.vision_config.image_size} "
                                      f"px images, not the scene config's {config.scene.image_size} px; give its "
                                      "own scene config")
    else:
        model_config = bundled.build_config(processor.tokenizer, **{"image_size": config.scene.image_size,
                                                                    "patch_size": bundled.patch_size(config.scene),
                                                                    **config.config_overrides})
        model = LlavaForConditionalGeneration(model_config).train()
    vision = model.config.vision_config
    processor.patch_size = vision.patch_size
    processor.image_processor.size = {"shortest_edge": vision.image_size}
    processor.image_processor.crop_size = {"height": vision.image_size, "width": vision.image_size}
    return model, processor


def _train_steps(model, processor, heads, batches, config: TrainingConfig, n_image_tokens: int, started: float,
                 progress: bool, val: str | Path | None, state: checkpoint.TrainingState, folder: Path) -> list[dict]:
    """The training loop: answer loss plus the weighted patch-head loss, AdamW, clipping, the schedule;
    from ``state``'s step, saving a checkpoint into ``folder`` every ``config.checkpoint_every`` steps."""
    projected: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: projected.append(out))
    try:
        lookup = LookupLoss(model, config.lookup_layer) if config.lookup_weight > 0 else None
    except ValueError as e:
        raise TrainingConfigError(str(e)) from None
    parameters = list(model.named_parameters()) + list(heads.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [p for _, p in parameters if p.ndim >= 2], "weight_decay": 0.05},
                                   {"params": [p for _, p in parameters if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=config.lr, betas=(0.9, 0.98))
    schedule = warmup_cosine(optimizer, config.steps)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
        schedule.load_state_dict(state.schedule)
    log = list(state.log)
    bar = tqdm(range(state.step, config.steps), desc="training", disable=not progress, initial=state.step,
               total=config.steps)
    try:
        for step in bar:
            batches.max_objects = curriculum_max_objects(step, config.curriculum, config.curriculum_start,
                                                         config.scene)
            batch = next(batches)
            targets = batch.pop("patch_targets", None)
            reads = batch.pop("lookup", None)
            counting = batch.pop("count_lookup", None)
            projected.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                answer_loss = model(**batch).loss
                loss = answer_loss
                if targets is not None:
                    aux = heads.loss(projected[0].view(len(batch["input_ids"]), n_image_tokens, -1), targets)
                    loss = answer_loss + config.aux_weight * aux
                if lookup is not None:
                    lookup_loss = lookup.loss(reads, counting)
                    loss = loss + config.lookup_weight * lookup_loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            record = {"step": step + 1, "loss": round(answer_loss.item(), 5),
                      "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - started, 1)}
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if targets is not None:
                record["aux_loss"] = round(aux.item(), 5)
            if lookup is not None:
                record["lookup_loss"] = round(lookup_loss.item(), 5)
            if config.eval_every and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
                families = first_token_accuracy(model, processor, val)
                record["val_accuracy"] = families.pop("overall")
                record["val_families"] = families
            log.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", **({"val": record["val_accuracy"]}
                                                              if "val_accuracy" in record else {}))
            if not progress and ("val_accuracy" in record or (step + 1) % 25 == 0):
                print(json.dumps(record), flush=True)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                checkpoint.save(folder, _state(config, step + 1, batches, started, model, heads, optimizer, schedule,
                                               log, state.warmup_log))
    finally:
        hook.remove()
        if lookup is not None:
            lookup.remove()
    return log


def _save(model, processor, folder: Path, config: TrainingConfig, log: list[dict], warmup_log: list[dict],
          started: float) -> TrainingSummary:
    """The checkpoint, processor, log (continuing its source's), loss curve and summary into ``folder``."""
    model.eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / SCENE_RECORD).write_text(record_text(config.scene))
    previous, history = None, []
    source = Path(config.init_from) if config.init_from is not None else None
    if source is not None and (source / "training_summary.json").is_file():
        previous = TrainingSummary.from_dict(json.loads((source / "training_summary.json").read_text()))
    if source is not None and (source / "training_log.jsonl").is_file():
        # one log and one curve for the whole chain of runs: later stages continue the step count
        history = [json.loads(line) for line in (source / "training_log.jsonl").open()]
        stage, offset = history[-1].get("stage", 1) + 1, history[-1]["step"]
        log = [{**r, "step": r["step"] + offset, "stage": stage} for r in log]
    with (folder / "training_log.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in history + log)
    from analysis.study.plots import loss_curve
    loss_curve(history + log).savefig(folder / "loss_curve.png", dpi=120, bbox_inches="tight")
    wall = round(time.time() - started, 1)
    text = model.config.text_config
    summary = TrainingSummary(
        steps=config.steps, batch_size=config.batch_size, turns=config.turns, lr=config.lr, seed=config.seed,
        describe=config.describe, curriculum=config.curriculum, curriculum_start=config.curriculum_start,
        text_init=text.initializer_range, nearest_targets=config.nearest_targets, image_norm=config.image_norm,
        vision_warmup=config.vision_warmup,
        vision_warmup_final_aux=warmup_log[-1]["aux_loss"] if warmup_log else None, aux_weight=config.aux_weight,
        family_weights=config.family_weights, bf16=config.bf16,
        init_from=portable(config.init_from) if config.init_from else None, start=config.start,
        previous=previous,
        config={k: v for k, v in text.to_dict().items()
                if k in ("hidden_size", "num_hidden_layers", "num_attention_heads")},
        wall_seconds=wall, threads=torch.get_num_threads(), final_loss=log[-1]["loss"],
        parameters=sum(p.numel() for p in model.parameters()),
        total_steps=config.steps + (previous.total_steps if previous else 0),
        total_wall_seconds=round(wall + (previous.total_wall_seconds if previous else 0), 1),
        config_overrides=config.config_overrides, scene=config.scene.to_dict(),
        lookup_weight=config.lookup_weight, count_lookup=config.count_lookup,
        lookup_layer=(text.num_hidden_layers // 2 if config.lookup_layer is None else config.lookup_layer)
        if config.lookup_weight > 0 else None)
    (folder / "training_summary.json").write_text(json.dumps(summary.as_dict(), indent=1))
    return summary


def _family_weights_argument(text: str) -> dict[str, float]:
    try:
        return parse_family_weights(text)
    except ValueError as error:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.train_bundled", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=bundled.BUNDLED_MODEL)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--turns", type=int, default=8, help="questions per image in a training sequence")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=300,
                        help="val accuracy every N steps (0: never), on the bundled val split when it records the "
                             "run's scene config, else on a val split of that config generated for the run")
    parser.add_argument("--no-describe", action="store_true",
                        help="leave out the dense 'Describe the image.' turn")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    parser.add_argument("--init-from", type=Path, help="continue from this checkpoint's weights")
    parser.add_argument("--text-width", type=int, default=192)
    parser.add_argument("--text-heads", type=int, default=3)
    parser.add_argument("--text-layers", type=int, default=8)
    parser.add_argument("--text-init", type=float, default=0.07,
                        help="std of the language model's initial weights (Llama's 0.02 suits widths near 4096; "
                             "0.07, about 1/sqrt(192), let the LM read colours within 150 steps)")
    parser.add_argument("--image-norm", choices=sorted(bundled.NORMALISATIONS), default="background",
                        help="image mean/std: CLIP's, or centred on the benchmark's background")
    parser.add_argument("--vision-warmup", type=int, default=1500,
                        help="steps of training the vision tower + projector alone on the patch heads first")
    parser.add_argument("--nearest-targets", action=argparse.BooleanOptionalAction, default=True,
                        help="add the nearest-object patch targets (pair, centre cell, counts) to the aux heads")
    parser.add_argument("--aux-weight", type=float, default=1.0,
                        help="weight of the per-patch auxiliary losses (0: none)")
    parser.add_argument("--curriculum", type=int, default=300,
                        help="steps over which the most objects per training scene grows from --curriculum-start "
                             "to the scene config's max objects (0: off)")
    parser.add_argument("--curriculum-start", type=int, default=None,
                        help="most objects per scene when the curriculum starts (default: the scene config's "
                             "min objects)")
    parser.add_argument("--start", type=int, default=0, help="first scene index of the training stream")
    parser.add_argument("--family-weights", type=_family_weights_argument, default=None,
                        help="draw each turn's question family with these weights, e.g. existence=3,spatial=3 "
                             "(default: families in turn, equal shares)")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast for the matmuls (weights and optimizer stay float32; "
                             "~25%% faster per step on a CPU with AVX512-BF16)")
    parser.add_argument("--lookup-weight", type=float, default=0.0,
                        help="weight of the lookup supervision: one head of --lookup-layer taught to attend, at "
                             "each answer, to the visual tokens of the objects the question is about (0: off)")
    parser.add_argument("--count-lookup", action="store_true",
                        help="with --lookup-weight, also teach the next head, at each count answer, even attention "
                             "over <s> and the counted objects' tokens (its output then holds 1 / (n + 1))")
    parser.add_argument("--lookup-layer", type=int, default=None,
                        help="the language-model layer of the supervised head (default: half its depth)")
    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="save the run's state into <out>.partial every N steps (0: never); started again with "
                             "the same settings, an interrupted run resumes from it")
    shapes.add_scene_arguments(parser)
    args = parser.parse_args(argv)
    architecture = {"text_width": args.text_width, "text_heads": args.text_heads,
                    "text_kv_heads": args.text_heads, "text_layers": args.text_layers,
                    "text_init": args.text_init}
    try:
        scene = shapes.scene_from_arguments(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = TrainingConfig(
        steps=args.steps, batch_size=args.batch_size, turns=args.turns, lr=args.lr, seed=args.seed,
        eval_every=args.eval_every, config_overrides=architecture, describe=not args.no_describe,
        init_from=args.init_from, start=args.start, aux_weight=args.aux_weight, curriculum=args.curriculum,
        curriculum_start=args.curriculum_start, nearest_targets=args.nearest_targets, image_norm=args.image_norm,
        vision_warmup=args.vision_warmup, family_weights=args.family_weights, bf16=args.bf16, scene=scene,
        checkpoint_every=args.checkpoint_every, lookup_weight=args.lookup_weight,
        lookup_layer=args.lookup_layer, count_lookup=args.count_lookup)
    try:
        summary = train(args.out, config, progress=not args.no_progress)
    except TrainingConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary.as_dict(), indent=1))
    return 0


if __name__ == "__main__":
    main()

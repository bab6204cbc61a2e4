"""The bundled model's training data: one image of the training stream with several benchmark questions
as a LLaVA-1.5 multi-turn conversation, batched, with per-patch targets for the training-only heads.

``ConversationBatches`` draws scenes from ``analysis.benchmark.shapes``'s training stream (seeds disjoint
from the test and val splits); ``encode_conversation`` lays one out (loss on answers and their ``</s>``
only: the rest is ``IGNORE``); ``weighted_questions`` draws question families with weights
(``--family-weights``); ``curriculum_max_objects`` grows the objects per scene over training.
"""

from __future__ import annotations

import numpy as np
import torch

from analysis.benchmark import shapes
from analysis.benchmark.scene_config import DEFAULT, SceneConfig

IGNORE = -100
# Families whose answers the lookup supervision teaches a head to read from their objects' tokens. Not count:
# a head whose attention is spread evenly over n objects returns their mean, which holds no count.
LOOKUP_FAMILIES = ("existence", "colour", "shape", "position", "spatial")


def encode_conversation(tokenizer, n_image_tokens: int, image_token_id: int,
                        turns: list[shapes.Question], answer_positions: list[int] | None = None
                        ) -> tuple[list[int], list[int]]:
    """Token ids and labels of one multi-turn conversation about one image; ``answer_positions``, when
    given, receives per turn the position whose logits predict the answer's first token."""
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = [tokenizer.bos_token_id] + enc("USER:") + [image_token_id] * n_image_tokens
    labels = [IGNORE] * len(ids)
    for k, q in enumerate(turns):
        question = enc((f"{q.question} ASSISTANT:") if k == 0 else f"USER: {q.question} ASSISTANT:")
        target = enc(q.answer) + [tokenizer.eos_token_id]
        ids += question
        if answer_positions is not None:
            answer_positions.append(len(ids) - 1)
        ids += target
        labels += [IGNORE] * len(question) + target
    return ids, labels


def weighted_questions(objects, rng: np.random.Generator, n: int, weights: dict[str, float],
                       config: SceneConfig = DEFAULT) -> list[shapes.Question]:
    """Up to ``n`` distinct questions about the scene, each family drawn with probability ~ ``weights``.

    Why: one-bit yes/no answers (existence, spatial) give the weakest gradient of all the families, and
    with families in equal shares the model settled on answering them with a constant.
    """
    families = [f for f in config.families if weights.get(f, 0) > 0]
    p = np.array([weights[f] for f in families], dtype=float)
    questions: list[shapes.Question] = []
    for _ in range(4 * n):
        if len(questions) == n:
            break
        q = shapes.make_question(objects, families[int(rng.choice(len(families), p=p / p.sum()))], rng, config)
        if q is not None and q.question not in {x.question for x in questions}:
            questions.append(q)
    return questions


def parse_family_weights(text: str, config: SceneConfig = DEFAULT) -> dict[str, float]:
    """``"existence=3,spatial=3"`` -> a weight per family of ``config`` (families not named weigh 1)."""
    weights = dict.fromkeys(config.families, 1.0)
    for item in filter(None, (part.strip() for part in text.split(","))):
        family, _, value = item.partition("=")
        if family not in weights or not value:
            raise ValueError(f"bad family weight {item!r}: write family=weight with a family of "
                             f"{list(config.families)}, e.g. {config.families[0]}=3,{config.families[-1]}=3")
        weights[family] = float(value)
    if sum(weights.values()) <= 0 or min(weights.values()) < 0:
        raise ValueError(f"family weights must be >= 0 and not all zero, got {weights}")
    return weights


class ConversationBatches:
    """Endless batches of the training stream of ``scene``, as model inputs with labels (right padded).

    With ``lookup``, ``batch["lookup"]`` [batch, query, key] (bool) marks, at each answer position of a
    ``LOOKUP_FAMILIES`` question, the visual tokens of the objects it is about; with ``count_lookup``,
    ``batch["count_lookup"]`` holds, at each count answer, even weights over ``<s>`` and the counted objects'
    tokens (``analysis.bundled.lookup.LookupLoss`` reads both)."""

    def __init__(self, processor, n_image_tokens: int, batch_size: int, turns: int, start: int = 0,
                 describe: bool = False, patch_targets: bool = False,
                 family_weights: dict[str, float] | None = None, scene: SceneConfig = DEFAULT,
                 lookup: bool = False, count_lookup: bool = False):
        self.processor, self.batch_size, self.turns, self.describe = processor, batch_size, turns, describe
        self.scene = scene
        self.family_weights = family_weights
        self.patch_targets = patch_targets
        self.n_image_tokens = n_image_tokens
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.index = start
        self.max_objects = scene.max_objects  # the curriculum lowers this early in training
        self.lookup, self.count_lookup = lookup, count_lookup
        # where encode_conversation puts the first visual token: after <s> and "USER:"
        self.image_start = 1 + len(processor.tokenizer("USER:", add_special_tokens=False)["input_ids"])

    def __next__(self) -> dict[str, torch.Tensor]:
        images, sequences, scenes, lookups, counts = [], [], [], [], []
        while len(images) < self.batch_size:
            objects, rng = shapes.scene("train", self.index, self.scene)
            if len(objects) > self.max_objects:
                self.index += 1
                continue
            scenes.append(objects)
            if self.family_weights is None:
                questions = shapes.scene_questions(objects, rng, self.turns,
                                                   first_family=self.index % len(self.scene.families),
                                                   config=self.scene)
            else:
                questions = weighted_questions(objects, rng, self.turns, self.family_weights, self.scene)
            if self.describe:
                questions.append(shapes.describe(objects, self.scene))
            images.append(shapes.render(objects, self.scene))
            positions: list[int] = []
            sequences.append(encode_conversation(self.processor.tokenizer, self.n_image_tokens,
                                                 self.image_token_id, questions, positions))
            if self.lookup or self.count_lookup:
                lookups.append([(p, self._patches(objects, shapes.referents(q, objects)))
                                for p, q in zip(positions, questions) if q.family in LOOKUP_FAMILIES])
                counts.append([(p, self._patches(objects, shapes.referents(q, objects)))
                               for p, q in zip(positions, questions) if q.family == "count"])
            self.index += 1
        width = max(len(ids) for ids, _ in sequences)
        pad = self.processor.tokenizer.pad_token_id
        input_ids = torch.full((len(sequences), width), pad)
        labels = torch.full((len(sequences), width), IGNORE)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, (ids, lab) in enumerate(sequences):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(ids)] = torch.tensor(lab)
            mask[row, :len(ids)] = 1
        pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}
        if self.patch_targets:
            grid = int(round(self.n_image_tokens ** 0.5))
            targets = [shapes.patch_labels(o, grid, self.scene) for o in scenes]
            batch["patch_targets"] = {k: torch.from_numpy(np.stack([t[k] for t in targets])) for k in targets[0]}
        if self.lookup:
            # [batch, query, key]: the visual tokens each answer position should read
            mask = torch.zeros(len(sequences), width, width, dtype=torch.bool)
            for row, turns in enumerate(lookups):
                for position, patches in turns:
                    mask[row, position, [self.image_start + p for p in patches]] = True
            batch["lookup"] = mask
        if self.count_lookup:
            # [batch, query, key]: for a count answer, even attention over <s> and the n counted objects' tokens
            target = torch.zeros(len(sequences), width, width)
            for row, turns in enumerate(counts):
                for position, patches in turns:
                    keys = [0] + [self.image_start + p for p in patches]
                    target[row, position, keys] = 1.0 / len(keys)
            batch["count_lookup"] = target
        return batch

    def _patches(self, objects, indices: list[int]) -> list[int]:
        """The visual tokens (row-major patch indices) under the centres of ``objects[i]`` for i in ``indices``."""
        grid = int(round(self.n_image_tokens ** 0.5))
        cell = self.scene.image_size / grid
        return [int(objects[i].y // cell) * grid + int(objects[i].x // cell) for i in indices]


def curriculum_max_objects(step: int, curriculum_steps: int, first: int | None = None,
                           config: SceneConfig = DEFAULT) -> int:
    """Most objects a training scene may hold at ``step``: ``first`` (default: the config's
    ``min_objects``) at first, growing linearly to ``max_objects`` by ``curriculum_steps``.

    Why: with one object per image any pooling of the visual tokens answers every question, so the
    language model learns to read the tokens before it has to learn to *select* among them; two-object
    scenes are the easiest on which a spatial relation can be asked.
    """
    first = config.min_objects if first is None else first
    if step >= curriculum_steps:
        return config.max_objects
    span = config.max_objects - first + 1
    return first + int(span * step / curriculum_steps)

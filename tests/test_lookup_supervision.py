"""Lookup supervision of the bundled model's training: which visual tokens each answer is taught to read,
and the loss on one head's attention."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from analysis.benchmark import shapes
from analysis.benchmark.scene_config import SceneConfig
from analysis.bundled import recipe as bundled
from analysis.bundled.batches import IGNORE, LOOKUP_FAMILIES, ConversationBatches
from analysis.bundled.lookup import LookupLoss

GRID = SceneConfig(image_size=64, grid=8, sizes={"small": 7}, min_objects=1, max_objects=8, min_separation=16,
                   families=("existence", "colour", "shape", "count", "position", "spatial"))
TINY = {"text_layers": 2, "text_width": 32, "text_heads": 2, "text_kv_heads": 2, "vision_layers": 1, "vision_width": 32}


def test_referents_are_the_objects_whose_tokens_carry_each_answer():
    objects = [shapes.ShapeObject("circle", "red", "small", 4, 4), shapes.ShapeObject("circle", "blue", "small", 20, 4),
               shapes.ShapeObject("square", "blue", "small", 36, 52)]
    ask = lambda text, answer, family, subtype: shapes.referents(shapes.Question(text, answer, family, subtype),  # noqa
                                                                 objects)
    assert ask("What color is the square?", "blue", "colour", "square") == [2]
    assert ask("What shape is the red object?", "circle", "shape", "red") == [0]
    assert ask("How many circles are there?", "2", "count", "circle") == [0, 1]
    assert ask("How many objects are there?", "3", "count", "objects") == [0, 1, 2]
    assert ask("Is there a blue circle?", "yes", "existence", "positive") == [1]
    assert ask("Is there a red square?", "no", "existence", "adversarial") == []
    assert ask("Is the blue square on the left or on the right?", "left", "position", "horizontal") == [2]
    assert ask("Is the red circle left of the blue square?", "yes", "spatial", "left of") == [0, 2]


def test_the_lookup_mask_marks_each_answer_position_and_the_visual_tokens_of_its_objects():
    processor = bundled.build_processor(normalisation="background", scene=GRID)
    batches = ConversationBatches(processor, 64, batch_size=4, turns=4, lookup=True, scene=GRID, start=11,
                                  describe=True)
    batch = next(batches)
    mask, ids, labels = batch["lookup"], batch["input_ids"], batch["labels"]
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    supervised = 0
    for row in range(4):
        objects, rng = shapes.scene("train", 11 + row, GRID)
        questions = shapes.scene_questions(objects, rng, 4, first_family=(11 + row) % len(GRID.families), config=GRID)
        positions = [p for p in range(ids.shape[1] - 1) if labels[row, p] == IGNORE and labels[row, p + 1] != IGNORE]
        assert len(positions) == len(questions) + 1  # and the describe turn, never supervised
        for position, question in zip(positions, questions):
            keys = mask[row, position].nonzero().flatten().tolist()
            referents = shapes.referents(question, objects) if question.family in LOOKUP_FAMILIES else []
            cells = [(objects[i].y // 8) * 8 + objects[i].x // 8 for i in referents]
            assert keys == sorted(batches.image_start + c for c in cells)
            assert all(ids[row, k] == image for k in keys)
            supervised += bool(keys)
        assert mask[row].any(-1).sum() == sum(bool(shapes.referents(q, objects)) for q in questions
                                              if q.family in LOOKUP_FAMILIES)
    assert supervised > 4


def test_the_lookup_loss_is_minus_log_the_heads_attention_on_its_tokens_and_detaches_cleanly():
    processor = bundled.build_processor(normalisation="background", scene=GRID)
    config = bundled.build_config(processor.tokenizer, image_size=64, patch_size=8, **TINY)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    batch = next(ConversationBatches(processor, 64, batch_size=2, turns=3, lookup=True, scene=GRID))
    reads = batch.pop("lookup")
    with pytest.raises(ValueError, match="--lookup-layer 5 is outside the language model's 2 layers"):
        LookupLoss(model, layer=5)
    assert model.config.text_config._attn_implementation == "sdpa"
    lookup = LookupLoss(model, layer=1, head=1)
    with torch.no_grad():
        model(**batch)
        loss = lookup.loss(reads)
        attention = model(**batch, output_attentions=True).attentions[1][:, 1]  # eager while attached
    lookup.remove()
    queries = reads.any(-1)
    expected = -torch.log((attention * reads).sum(-1)[queries] + 1e-6).mean()
    torch.testing.assert_close(loss, expected)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert lookup.hook.id not in model.model.language_model.layers[1].self_attn._forward_hooks


def test_count_answers_are_taught_even_attention_over_bos_and_the_counted_objects_on_the_next_head():
    processor = bundled.build_processor(normalisation="background", scene=GRID)
    batches = ConversationBatches(processor, 64, batch_size=3, turns=5, lookup=True, count_lookup=True,
                                  family_weights={"count": 1.0}, scene=GRID, start=3)
    batch = next(batches)
    counts, ids = batch.pop("count_lookup"), batch["input_ids"]
    reads = batch.pop("lookup")
    assert not reads.any()  # count questions only: none supervised on the lookup head
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    rows = counts.sum(-1) > 0
    assert rows.sum() >= 3 and torch.allclose(counts.sum(-1)[rows], torch.ones(int(rows.sum())))
    for row, position in rows.nonzero().tolist():
        keys = counts[row, position].nonzero().flatten().tolist()
        assert keys[0] == 0 and all(ids[row, k] == image for k in keys[1:])  # <s>, then the counted tokens
        assert torch.allclose(counts[row, position, keys], torch.full((len(keys),), 1 / len(keys)))
    config = bundled.build_config(processor.tokenizer, image_size=64, patch_size=8, **TINY)
    torch.manual_seed(1)
    model = LlavaForConditionalGeneration(config).eval()
    lookup = LookupLoss(model, layer=0, head=0)
    with torch.no_grad():
        model(**batch)
        loss = lookup.loss(reads, counts)
        counter = model(**batch, output_attentions=True).attentions[0][:, 1]
    lookup.remove()
    expected = -(counts * torch.log(counter + 1e-6)).sum(-1)[rows].mean()
    torch.testing.assert_close(loss, expected)

"""FLOPs of a VLM's forward pass over a prompt, with and without pruning (docs/definitions.md#flops).

A multiply-add counts 2. Per decoder layer with n tokens, width d and MLP width m (SwiGLU, three
matrices) the count is ``2 * (4*n*d^2 + 2*n^2*d + 3*n*d*m)``; with grouped-query attention the K and V
projections are narrower, and the ``4*n*d^2`` term becomes ``2*n*d^2 + 2*n*d*d_kv`` (identical when
there is no GQA, as in LLaVA-1.5). The whole-model figure adds the vision tower and the projector of
the model's family for the image (``lofi.families``: LLaVA-NeXT's any-resolution crops, Qwen2-VL's
dynamic resolution, Qwen2.5-VL's windowed attention), the LM head for the last position only, and a
method's own decision modules. Norms, RoPE, softmax, biases and the embedding lookup are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from lofi.families import family_class


@dataclass(frozen=True)
class Flops:
    """Floating-point operations of one prompt's forward pass.

    Attributes:
        llm: the decoder layers only.
        vision: the vision tower.  projector: the multimodal projector.  lm_head: last position only.
        decision: a method's own decision modules (0 for training-free methods).
        total: everything above.
    """

    llm: float
    vision: float
    projector: float
    lm_head: float
    decision: float = 0.0

    @property
    def total(self) -> float:
        return self.llm + self.vision + self.projector + self.lm_head + self.decision


def decoder_layer_flops(n: int, d: int, m: int, d_kv: int | None = None) -> float:
    d_kv = d if d_kv is None else d_kv
    return 2.0 * (2 * n * d * d + 2 * n * d * d_kv + 2 * n * n * d + 3 * n * d * m)


def attention_widths(text_config) -> tuple[int, int]:
    """(d_q, d_kv): the widths of a decoder layer's query and key/value projections, heads x head_dim."""
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return heads * head_dim, (getattr(text_config, "num_key_value_heads", None) or heads) * head_dim


def count_flops(config, n_text: int, n_visual: int, stages: Sequence[tuple[int, int]] = (),
                decision: float = 0.0, image=None) -> Flops:
    """FLOPs of a prompt of ``n_text`` text and ``n_visual`` visual tokens.

    Args:
        config: a transformers config of a supported family (``LlavaConfig``, ``Qwen2VLConfig``, ...).
        stages: ``(layer, n_visual_kept)`` pairs: from ``layer`` on, ``n_visual_kept`` visual tokens remain.
        decision: FLOPs of the method's decision modules, added to the total.
        image: the image the vision tower sees, in the family's terms: ``(height, width)`` in pixels for
            LLaVA-NeXT / OneVision (a row of the processor's ``image_sizes``), ``(frames, rows, cols)`` of
            patches for Qwen2-VL / Qwen2.5-VL (a row of ``image_grid_thw``); LLaVA-1.5 takes none.
            Default: the family's ``default_image``.
    """
    text = config.text_config
    d, m, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    d_kv = attention_widths(text)[1]
    schedule = sorted(stages)
    for (a, _), (b, _) in zip(schedule, schedule[1:]):
        if a == b:
            raise ValueError(f"two stages at layer {a}")
    llm = 0.0
    for layer in range(layers):
        visual = n_visual
        for start, kept in schedule:
            if layer >= start:
                visual = kept
        llm += decoder_layer_flops(n_text + visual, d, m, d_kv)
    family = family_class(config)
    lm_head = 2.0 * d * text.vocab_size
    return Flops(llm=llm, vision=family.vision_flops(config, image), projector=family.projector_flops(config, image),
                 lm_head=lm_head, decision=decision)


def method_flops(config, method, n_text: int, n_visual: int, n_prunable: int | None = None, image=None) -> Flops:
    """FLOPs of one prompt of ``n_visual`` visual tokens (``n_prunable`` of them prunable, default all; LLaVA-NeXT's
    newline rows are not) pruned by ``method`` (a ``PruningMethod``): its schedule, and the decision work it
    spends, which is none at a stage that keeps every token it holds (``spent_decision_flops``), plus, for a
    method that reads the vision tower, the tower attention its family rebuilds (``Family.tower_view_flops``)."""
    n_prunable = n_visual if n_prunable is None else n_prunable
    fixed = n_visual - n_prunable
    schedule = method.schedule(config.text_config.num_hidden_layers, n_prunable, fixed)
    kept = [n - fixed for _, n in schedule]
    decision = method.spent_decision_flops(config, n_text, [n_prunable] + kept[:-1], kept)
    if method.reads_tower and kept and kept[0] < n_prunable:
        decision += family_class(config).tower_view_flops(config, image)  # the tower's attention, rebuilt once
    return count_flops(config, n_text, n_visual, schedule, decision=decision, image=image)

"""Lookup supervision for training the bundled model: which attention a head is taught, and its loss.

This module owns ``LookupLoss``: a hook on one language-model layer's attention that reads one head's
probabilities during a training forward, and the loss that teaches it, at each answer position, to read the
visual tokens of the objects the question is about (``ConversationBatches(lookup=True)`` builds the
masks from ``analysis.benchmark.shapes.referents``).
"""

from __future__ import annotations

import torch


class LookupLoss:
    """Lookup supervision: one attention head of one language-model layer is taught, at each answer
    position, to put its attention on the visual tokens of the objects the question is about
    (``shapes.referents``): loss = mean over supervised positions of -log(sum of that attention).

    Why: a from-scratch language model learns to *find* the object a question names slowly (the lookup
    circuit forms late), and meanwhile nothing stops it from summarising the scene into every visual token
    in its first layers, after which the choice of tokens no longer matters. Telling one head where to read
    gives the lookup directly, from the object's own token. The rest of the model is free. While it is
    attached the model runs eager attention (the head's probabilities are read from the layer's output);
    ``remove`` restores the implementation it had.
    """

    def __init__(self, model, layer: int | None = None, head: int = 0):
        layers = model.model.language_model.layers
        self.layer = len(layers) // 2 if layer is None else layer
        if not 0 <= self.layer < len(layers):
            raise ValueError(f"--lookup-layer {layer} is outside the language model's "
                             f"{len(layers)} layers; give 0 .. {len(layers) - 1}")
        self.model, self.head, self.weights = model, head, []
        self.implementation = model.config.text_config._attn_implementation
        model.set_attn_implementation("eager")
        self.hook = layers[self.layer].self_attn.register_forward_hook(
            lambda module, args, output: self.weights.append(output[1]))

    def loss(self, reads: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """``reads``: [batch, query, key] bool, the keys each supervised query should attend to (head
        ``head``). ``counts``: [batch, query, key] target distributions for count answers, taught to head
        ``head + 1`` by cross-entropy -sum p log a: even attention over ``<s>`` and the n counted tokens makes
        that head's output (v_<s> + sum v_i) / (n + 1), from which n can be read; the two losses are added."""
        weights = self.weights[-1]
        self.weights.clear()
        attention = weights[:, self.head]  # [batch, query, key]
        loss = attention.sum() * 0.0
        queries = reads.any(-1)
        if queries.any():
            loss = loss - torch.log((attention * reads).sum(-1)[queries].float() + 1e-6).mean()
        if counts is not None:
            counting = counts.sum(-1) > 0
            if counting.any():
                counter = weights[:, (self.head + 1) % weights.shape[1]]
                loss = loss - (counts * torch.log(counter.float() + 1e-6)).sum(-1)[counting].mean()
        return loss

    def remove(self) -> None:
        self.hook.remove()
        self.model.set_attn_implementation(self.implementation)

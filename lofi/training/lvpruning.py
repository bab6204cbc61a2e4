"""Training LVPruning's decision modules (Sun et al., NAACL 2025 Findings, section 3.2).

``soft_pruning`` runs the frozen model on every token while the modules decide: Gumbel-Softmax decisions
(eq. 5-6), made cumulative (eq. 10), enter each layer's attention as the multiplicative mask of eq. 7-9
(``masked_attention``), so the causal loss reaches the modules; ``ratio_loss`` is eq. 11.
``topk_decisions`` trains on inference's own top-k choice instead (not in the paper). Inference is
``lofi.methods.lvpruning``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from lofi.families import family_for
from lofi.methods.lvpruning import DecisionModules, standard_gumbel, text_tokens

ATTENTION = "lofi_lvpruning_soft"  # the attention implementation soft_pruning installs while active


@dataclass
class SoftMaskState:
    """The decisions of the training forward pass (eq. 7-10).

    Attributes:
        layer_weights: layer -> [batch, n] key weights (1 for text tokens, the cumulative decision D for
            visual tokens) from the first stage layer on.
        decisions: per stage, [batch, n_visual] cumulative decisions (for ``ratio_loss``).
    """

    layer_weights: dict[int, torch.Tensor] = field(default_factory=dict)
    decisions: list[torch.Tensor] = field(default_factory=list)
    current: torch.Tensor | None = None


def masked_attention(scores: torch.Tensor, m: torch.Tensor, value: torch.Tensor):
    """Eq. 9 for 0/1 decisions M: exp(A_ij) M_ij / sum_k exp(A_ik) M_ik, then times V; (out, probs).

    The forward pass is a softmax over the kept keys alone, as true dropping computes it: eq. 9 written
    with the full softmax underflows where the kept keys hold less than float32's smallest mass.

    The gradient with respect to M is bounded: d out_i / d M_ij = c_ij (v_j - out_i) with c_ij eq. 9's
    own p_ij / Sigma_i at kept keys (Sigma_i = sum_k p_ik M_ik, the mass left on kept keys), and at a
    dropped key the attention it would receive were it kept again, p_ij / (Sigma_i + p_ij). Eq. 9's
    derivative there is p_ij / Sigma_i, unbounded as Sigma_i -> 0; on the bundled model under stage-3
    masks 9-16% of text queries at layers 4-7 keep less than 1e-3 of their mass (down to 1e-22): mean
    per-token derivatives reached 1e6, and after clipping a few such rows decided every update alone.
    """
    kept = m.detach() > 0.5
    kept_scores = scores.float().masked_fill(~kept, float("-inf"))
    probs = torch.softmax(kept_scores, -1).nan_to_num(0.0)  # rows with no key left: 0, not NaN
    out = probs.to(value.dtype) @ value
    if m.requires_grad:
        with torch.no_grad():
            readded = torch.sigmoid(scores.float() - torch.logsumexp(kept_scores, -1, keepdim=True))
            c = torch.where(kept, probs, readded).nan_to_num(0.0)
        delta = ((m - m.detach()) * c).to(value.dtype)  # zero in value; its derivative in M is c
        out = out + delta @ value.detach() - delta.sum(-1, keepdim=True) * out.detach()
    return out, probs


def _attention(state: SoftMaskState):
    """An eager attention function whose probabilities are reweighted by the state's M (eq. 9)."""

    def attend(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = (query @ key.transpose(-1, -2)) * scaling
        q_len, k_len = scores.shape[-2:]
        if attention_mask is None:
            allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        elif attention_mask.dtype == torch.bool:
            allowed = attention_mask
        else:
            allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = state.layer_weights.get(module.layer_idx)
        if weights is None:
            # a padding query may see no key at all: its row is 0, not NaN (NaN would leak through 0 * NaN)
            probs = torch.softmax(scores.float(), -1).nan_to_num(0.0)
            out = probs.to(value.dtype) @ value
        else:
            m = weights[:, None, None, :].expand(-1, 1, q_len, -1)
            eye = torch.eye(q_len, k_len, device=query.device, dtype=torch.bool)  # M_ii = 1 (eq. 7)
            out, probs = masked_attention(scores, torch.where(eye, torch.ones_like(m), m), value)
        return out.transpose(1, 2).contiguous(), probs

    return attend


def topk_decisions(keep_log_odds: torch.Tensor, k: int, previous: torch.Tensor | None, tau: float = 1.0,
                   noise: float = 0.0) -> torch.Tensor:
    """Straight-through top-k: in value the 0/1 choice of inference (the k highest keep log-odds among
    the tokens ``previous`` kept, nested as at inference), plus ``noise`` x standard Gumbel noise on
    the scores (exploration; 1 draws the k without replacement with weights = keep odds, 0 is
    inference's top-k); in gradient, that of the keep probability sigmoid(log-odds / tau)."""
    soft = torch.sigmoid(keep_log_odds / tau)
    scores = keep_log_odds.detach()
    if noise > 0:
        scores = scores + noise * standard_gumbel(torch.rand_like(scores))
    if previous is not None:
        scores = scores.masked_fill(previous.detach() < 0.5, float("-inf"))
    hard = torch.zeros_like(soft).scatter(1, scores.topk(k, dim=1).indices, 1.0)
    return hard + soft - soft.detach()


@dataclass
class _Decider:
    """How one stage turns its module's logits into cumulative decisions (eq. 5-6 and 10)."""

    modules: DecisionModules
    tau: float = 1.0
    fixed: list[torch.Tensor] | None = None
    readable: torch.Tensor | None = None
    topk: list[float] | None = None
    noise: float = 0.0

    def decide(self, state: SoftMaskState, stage: int, hidden, visual, valid) -> torch.Tensor:
        n = int(visual[0].sum())
        positions = visual.nonzero()[:, 1].view(len(hidden), n)
        visual_hidden = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        text = valid & ~visual if self.readable is None else valid & ~visual & self.readable.to(valid.device)
        logits = self.modules.stages[stage](visual_hidden, *text_tokens(hidden, text))
        previous = state.decisions[-1] if state.decisions else None
        if self.topk is not None:
            k = max(1, math.ceil(self.topk[stage] * n - 1e-9))
            odds = logits[..., 0].float() - logits[..., 1].float()
            decision = topk_decisions(odds, k, previous, self.tau, self.noise)
        else:
            decision = F.gumbel_softmax(logits.float(), tau=self.tau, hard=True)[..., 0]  # eq. 5-6
        if self.fixed is not None:
            decision = self.fixed[stage].to(decision) + 0 * decision
        if previous is not None:
            decision = decision * previous                                                # eq. 10
        state.decisions.append(decision)
        weights = torch.ones(visual.shape, dtype=decision.dtype, device=hidden.device)
        return weights.scatter(1, positions, decision)


@contextmanager
def soft_pruning(model, modules: DecisionModules, image_token_id: int | None = None, tau: float = 1.0,
                 fixed: list[torch.Tensor] | None = None, readable: torch.Tensor | None = None,
                 topk: list[float] | None = None, noise: float = 0.0):
    """Train-time forward: decisions at each stage layer mask visual keys from that layer on.

    Yields the ``SoftMaskState``; after a forward pass ``state.decisions`` holds each stage's
    cumulative decisions (for ``ratio_loss``). Nothing is removed; the model's attention implementation
    and hooks are restored on exit. ``fixed`` replaces the Gumbel draws by given per-stage 0/1 decisions
    [batch, n_visual] (tests). ``readable`` ([batch, seq] bool) limits the text tokens the modules read;
    pass the prompt: at inference they decide at prefill, before any answer token exists, and a
    teacher-forced answer in their keys would let them choose by the answer instead of the question.
    ``topk`` (per-stage keep ratios) replaces the paper's independent Gumbel-Softmax decisions (eq. 5-6)
    by inference's own choice, ``topk_decisions`` with ``noise``: exactly ceil(ratio x n) tokens.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    family = family_for(model)
    state = SoftMaskState()
    decider = _Decider(modules, tau, fixed, readable, topk, noise)
    stage_of_layer = {layer: s for s, layer in enumerate(modules.settings["layers"])}
    inputs: dict = {}
    hooks = []

    def on_multimodal(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        inputs["visual"] = family.visual_mask(ids) if image_token_id is None else ids == image_token_id
        inputs["valid"] = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        state.layer_weights.clear()
        state.decisions.clear()

    def on_layer(index):
        def hook(module, args, kwargs):
            if index in stage_of_layer:
                hidden = args[0] if args else kwargs["hidden_states"]
                state.current = decider.decide(state, stage_of_layer[index], hidden, inputs["visual"], inputs["valid"])
            if state.decisions:
                state.layer_weights[index] = state.current
        return hook

    # an attention function bound to this state (re-registering the name replaces an earlier one)
    AttentionInterface.register(ATTENTION, _attention(state))
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    text_config = model.config.text_config
    previous = text_config._attn_implementation
    try:
        text_config._attn_implementation = ATTENTION  # read at every forward: the kernel the layers call
        hooks.append(family.multimodal_model().register_forward_pre_hook(on_multimodal, with_kwargs=True))
        layers = family.layers()
        for i in range(min(stage_of_layer), len(layers)):
            hooks.append(layers[i].register_forward_pre_hook(on_layer(i), with_kwargs=True))
        yield state
    finally:
        text_config._attn_implementation = previous
        for h in hooks:
            h.remove()


def ratio_loss(decisions: list[torch.Tensor], targets: list[float]) -> torch.Tensor:
    """Eq. 11: (1/S) sum_s (rho_s - mean_i D_{s,i})^2, averaged over the batch."""
    terms = [(rho - d.mean(-1)).pow(2).mean() for d, rho in zip(decisions, targets)]
    return torch.stack(terms).mean()

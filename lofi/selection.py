"""One pruning stage applied to a prompt: the method is shown what the stage holds, chooses, and the
sequence keeps its choice.

``run_stage`` builds the method's ``StageInput`` from the prompt's bookkeeping (``lofi.sequence``),
calls ``select``, checks a method's own ``select`` against the contract (``checked_choice``), and
applies the choice with the tensor steps of ``lofi.stage`` (compiled inside ``lofi.compiled``), the new
states of a merging method's ``Choice`` written in first. A stage
that keeps every token it holds runs neither the method nor the step. ``lofi.runtime`` records what it
returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from lofi import stage as stage_steps
from lofi.compiled import options_of
from lofi.registry import Choice, PruningMethod, StageInput
from lofi.sequence import Sequence

if TYPE_CHECKING:
    from lofi.vision import TowerView

# (index, valid, text) of the tokens a stage holds -> [B, n] attention each receives at the layer before it
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (index, candidates' positions, candidates' validity) of a stage -> the vision tower's view of its candidates
Tower = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "TowerView"]


def steps_for(model: torch.nn.Module) -> stage_steps.Steps:
    """The stage's tensor work: compiled inside ``lofi.compiled`` (with its backend), eager otherwise."""
    options = options_of(model)
    return stage_steps.EAGER if options is None else stage_steps.compiled_steps(options.get("backend", "inductor"))


def run_stage(seq: Sequence, stage: int, layer: int, hidden: torch.Tensor, method: PruningMethod,
              model: torch.nn.Module, attention: Attention | None, check: bool, tower: Tower | None = None):
    """Stage ``stage`` (1-based, at decoder layer ``layer``) applied to ``hidden``, the states entering it.

    Args:
        attention: what an attention-ranked method is shown (None for the others).
        check: check the method's choice against the ``select`` contract (one host sync when it holds).
        tower: for a method that reads the vision tower, what makes its ``TowerView`` from the candidates.

    Returns:
        (index [B, n'] original positions kept, -1 at padding slots; kept [B, max n_keep] kept original
        visual-token indices, increasing, -1 padded; hidden [B, n', d] their hidden states; merged: None, or
        what a merging method did, ``Merged``).
    """
    current = seq.index[stage - 1]
    identity = current is seq.index[0]  # the prompt as it came: nothing to read through an index
    valid, prunable = seq.at(current, seq.valid), seq.at(current, seq.prunable)
    plan = seq.plans[stage - 1]
    n_keep, most, widest, new_width, narrowest, uniform = plan[1:7]
    seq.slotted.append(narrowest < new_width)  # rows of different lengths: padding slots from here on
    steps = steps_for(model)
    rank = None if identity and seq.all_prunable else seq.at(current, seq.visual_rank)
    order, visual_valid, visual_index = steps.candidates(prunable, rank, most, uniform)
    if stage_steps.keeps_everything(plan, seq.slotted):
        # neither the method nor the step runs: at batch 1 their kernels are most of the runtime's cost
        return current, visual_index, hidden, None
    n_keep_host, n_keep = n_keep, n_keep.to(current.device, non_blocking=True)
    text = seq.at(current, seq.text)
    state = StageInput(
        layer=layer, stage=stage - 1, hidden=hidden, visual=order, visual_valid=visual_valid,
        visual_index=visual_index, text=text, valid=valid, n_keep=n_keep,
        attention=(lambda: attention(current, valid, text)) if attention is not None else None,
        fingerprint=seq.fingerprint(), model=model, keep_width=widest, text_width=seq.host.text_width,
        n_keep_host=n_keep_host, instruction=lambda: text & seq.at(current, seq.instruction()),
        tower=(lambda: tower(current, order, visual_valid)) if tower is not None else None,
        visual_width=seq.host.visual_width, full=uniform)
    chosen, states, sources = method.select(state), None, None
    if isinstance(chosen, Choice):
        chosen, states, sources = chosen
    if check:
        chosen = checked_choice(method.name, chosen, state)
    chosen = chosen.to(torch.long)
    if states is not None:
        hidden = stage_steps.write_states(hidden, order, chosen, states)
    index, kept, hidden = steps.apply_choice(current, prunable, order, chosen, visual_index, hidden, new_width,
                                             uniform, identity)
    if states is None:
        return index, kept, hidden, None
    into = None
    if sources is not None:
        target = torch.where(sources >= 0, visual_index.gather(1, sources.clamp_min(0)), -1)
        into = torch.stack([visual_index, target], -1)
    merged = Merged(stage_steps.in_kept_order(chosen, visual_index, states), into)
    return index, kept, hidden, merged


class Merged(NamedTuple):
    """What a merging method did at a stage: ``states`` [B, max n_keep, d] of the kept tokens (in the order of
    the handle's ``kept``), and ``into`` None or [B, P, 2] (original visual index of a candidate, original
    visual index of the kept token it was merged into or -1)."""

    states: torch.Tensor
    into: torch.Tensor | None


def checked_choice(name: str, chosen: torch.Tensor, state: StageInput) -> torch.Tensor:
    """Method ``name``'s choice, or one error that says how it breaks the ``select`` contract (one host
    sync when it holds)."""
    batch, most = state.visual.shape
    if chosen.ndim != 2 or chosen.shape[0] != batch:
        raise RuntimeError(f"{name}.select returned shape {tuple(chosen.shape)}, expected ({batch}, max n_keep)")
    chosen = chosen.to(device=state.visual.device, dtype=torch.long)
    picked = chosen >= 0
    real = state.visual_valid.gather(1, chosen.clamp(0, max(most - 1, 0)))
    marks = torch.zeros_like(state.visual).scatter_add(1, chosen.clamp(0, max(most - 1, 0)), picked.long())
    holds = torch.stack([(chosen < most).all(), (picked.sum(1) == state.n_keep).all(), (real | ~picked).all(),
                         (marks <= 1).all()])
    if bool(holds.all()):
        return chosen
    if not bool(holds[3]) and bool(holds[:3].all()):
        raise RuntimeError(f"{name}.select chose the same token twice")
    raise RuntimeError(f"{name}.select must return, per sample, n_keep = {state.n_keep.tolist()} distinct "
                       f"indices of its real visual tokens (-1 padding after them)")

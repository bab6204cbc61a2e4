"""Consistency of a pruned model with the unpruned one (docs/definitions.md#consistency), as pure functions.

Every comparison is against the baseline on the same sample and prompt: answer flips (with the
C->I / I->C split of Dutta et al. 2024, "Accuracy is not all you need"), KL and Jensen-Shannon
divergences of the next-token distributions, the teacher-forced KL over the baseline's answer, and
accuracy. All divergences use the natural log.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str | None) -> str:
    """Lower case, punctuation removed, whitespace collapsed and stripped (``None`` -> ``""``)."""
    return "" if text is None else " ".join(text.lower().translate(_PUNCTUATION).split())


def accuracy(answers: Sequence[str], gold: Sequence[str]) -> float:
    """Fraction of normalised answers equal to the normalised ground truth."""
    if len(answers) != len(gold):
        raise ValueError(f"{len(answers)} answers but {len(gold)} gold answers")
    if not answers:
        return float("nan")
    return sum(normalize_answer(a) == normalize_answer(g) for a, g in zip(answers, gold)) / len(answers)


@dataclass(frozen=True)
class Flips:
    """How a pruned model's answers differ from the baseline's.

    Attributes:
        n: number of samples.
        changed: samples whose normalised answer differs from the baseline's.
        flip_rate: changed / n (AllFlips).
        c_to_i: baseline correct, pruned wrong (count; ``None`` without gold).
        i_to_c: baseline wrong, pruned correct (count; ``None`` without gold).
        dutta_flips: (c_to_i + i_to_c) / n, Dutta et al.'s "Flips" (``None`` without gold).
    """

    n: int
    changed: int
    flip_rate: float
    c_to_i: int | None = None
    i_to_c: int | None = None
    dutta_flips: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def flips(baseline_answers: Sequence[str], pruned_answers: Sequence[str],
          gold: Sequence[str] | None = None) -> Flips:
    """Compare answers after normalisation; C->I and I->C need ``gold``.

    A flip is pruned != baseline. C->I + I->C <= changed, since a wrong answer can change into another
    wrong one (counted in ``changed`` only). Accuracy hides both: C->I and I->C cancel in it.
    """
    if len(baseline_answers) != len(pruned_answers):
        raise ValueError(f"{len(baseline_answers)} baseline answers but {len(pruned_answers)} pruned answers")
    n = len(baseline_answers)
    base = [normalize_answer(a) for a in baseline_answers]
    pruned = [normalize_answer(a) for a in pruned_answers]
    changed = sum(b != p for b, p in zip(base, pruned))
    rate = changed / n if n else float("nan")
    if gold is None:
        return Flips(n, changed, rate)
    if len(gold) != n:
        raise ValueError(f"{n} answers but {len(gold)} gold answers")
    truth = [normalize_answer(g) for g in gold]
    c_to_i = sum(b == t and p != t for b, p, t in zip(base, pruned, truth))
    i_to_c = sum(b != t and p == t for b, p, t in zip(base, pruned, truth))
    return Flips(n, changed, rate, c_to_i, i_to_c, (c_to_i + i_to_c) / n if n else float("nan"))


def kl_divergence(base_logits: torch.Tensor, pruned_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_base || P_pruned) = sum_v P_base(v) (log P_base(v) - log P_pruned(v)) over the last dim.

    Logits in (any leading shape), natural log, computed in float64 from log-softmax, so a token the
    pruned model gives vanishing probability contributes a large finite term. Terms with
    P_base(v) = 0 contribute 0; if P_pruned(v) underflows to exactly 0 where P_base(v) > 0 -- only with
    infinite logits -- the result is +inf, as the definition demands.
    """
    log_p = torch.log_softmax(base_logits.double(), -1)
    log_q = torch.log_softmax(pruned_logits.double(), -1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1).clamp_min(0)


def js_divergence(base_logits: torch.Tensor, pruned_logits: torch.Tensor) -> torch.Tensor:
    """JS(P, Q) = (KL(P || M) + KL(Q || M)) / 2, M = (P + Q) / 2; natural log, in [0, log 2].

    Symmetric and finite for any pair of distributions, disjoint supports included (then log 2).
    """
    p = torch.softmax(base_logits.double(), -1)
    q = torch.softmax(pruned_logits.double(), -1)
    m = (p + q) / 2
    log_m = m.clamp_min(torch.finfo(m.dtype).tiny).log()

    def kl_to_m(x):
        return torch.where(x > 0, x * (x.clamp_min(torch.finfo(x.dtype).tiny).log() - log_m),
                           torch.zeros_like(x)).sum(-1)

    return ((kl_to_m(p) + kl_to_m(q)) / 2).clamp(0, torch.log(torch.tensor(2.0, dtype=p.dtype)).item())


def forced_kl(base_logits: torch.Tensor, pruned_logits: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the baseline's answer positions of KL(P_base || P_pruned), one value per sample.

    Both logit tensors are [batch, positions, vocab] from teacher-forcing the *baseline's* answer (the
    pruned model reads the same tokens); ``answer_mask`` [batch, positions] marks the positions whose
    next-token distribution predicts an answer token. Samples with no answer position give 0.
    """
    per_position = kl_divergence(base_logits, pruned_logits)
    weights = answer_mask.to(per_position.dtype)
    return (per_position * weights).sum(-1) / weights.sum(-1).clamp_min(1)

"""FLOPs of one sample's selection by each kernel of ``lofi.selectors``, as pure functions of its shapes.

A multiply-add counts 2 (as ``lofi.flops``). ``matmul`` is what the kernel's matrix products cost (what
``torch.utils.flop_counter.FlopCounterMode`` reports for one sample); ``elementwise`` counts one per add,
subtract, multiply, divide, exp, square root, max or min on the kernel's arrays, including the reductions
(one per element reduced) and the row normalisations (``3 n w`` for n rows of width w: square, sum, divide).
Index selection (argmax, sort, top-k, gathers) is not counted. ``P``: the sample's visual tokens; ``n_keep``:
the tokens it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

from lofi.selectors.duplicates import duplicate_rounds, important_count


@dataclass(frozen=True)
class KernelFlops:
    """FLOPs of one sample's selection: ``matmul`` (matrix products) + ``elementwise`` = ``total``."""

    matmul: float
    elementwise: float

    @property
    def total(self) -> float:
        return self.matmul + self.elementwise


def cdpruner(P: int, d: int, n_keep: int, c: int, T: int) -> KernelFlops:
    """CDPruner: features ``d`` wide, relevance embeddings and ``T`` instruction rows ``c`` wide.

    matmul: ``2 P^2 d`` (cosine similarity) + ``2 P T c`` (relevance) + ``sum_{t<n_keep} 2 t P = n_keep (n_keep - 1) P``
    (the projection on the previous picks' Cholesky rows at each greedy step).
    elementwise: ``3 P d + 3 P c + 3 T c`` (normalisations) + ``P T + P`` (mean over instruction rows)
    + ``4 P`` (sign, min-max) + ``2 P^2`` (``r_i S_ij r_j``) + ``4 P n_keep`` (per step: subtract, divide,
    square, subtract over P).
    """
    matmul = 2.0 * P * P * d + 2.0 * P * T * c + float(n_keep) * (n_keep - 1) * P
    elementwise = 3.0 * (P * d + P * c + T * c) + P * T + 5.0 * P + 2.0 * P * P + 4.0 * P * n_keep
    return KernelFlops(matmul, elementwise)


def scope(P: int, d: int, n_keep: int) -> KernelFlops:
    """SCOPE: features ``d`` wide.

    matmul: ``2 P^2 d`` (cosine similarity).
    elementwise: ``3 P d`` (normalisation) + ``P`` (saliency power) + ``n_keep (3 P^2 + 2 P)`` (per step:
    ``S_ij - m_i``, ``max(0, .)``, the sum over i, the product with the saliency, the coverage update).
    """
    return KernelFlops(2.0 * P * P * d, 3.0 * P * d + P + n_keep * (3.0 * P * P + 2.0 * P))


def divprune(P: int, d: int, n_keep: int) -> KernelFlops:
    """DivPrune: features ``d`` wide.

    matmul: ``2 P^2 d`` (cosine similarity).
    elementwise: ``3 P d`` (normalisation) + ``P^2`` (``1 - S``) + ``(n_keep - 1) P`` (the running minimum distance).
    """
    return KernelFlops(2.0 * P * P * d, 3.0 * P * d + P * P + (n_keep - 1.0) * P)


def visionzip(P: int, d: int, n_keep: int, dk: int, n_contextual: int) -> KernelFlops:
    """VisionZip: merged states ``d`` wide, keys ``dk`` wide, ``C = n_contextual`` merged slots.

    matmul: ``2 P C dk`` (every token's key against the targets' keys) + ``2 C P d`` (sums of the merged states).
    elementwise: ``3 P dk`` (key normalisation) + ``P C`` (slot sizes) + ``2 C d`` (mean, plus the target's state).
    ``n_keep`` (the dominant tokens) costs only a sort.
    """
    C = n_contextual
    return KernelFlops(2.0 * P * C * dk + 2.0 * C * P * d, 3.0 * P * dk + P * C + 2.0 * C * d)


def vispruner(P: int, d: int, n_keep: int, important_ratio: float = 0.5) -> KernelFlops:
    """VisPruner: features ``d`` wide.

    matmul: ``2 P^2 d`` (cosine similarity of all pairs, computed once; the rounds gather from it).
    elementwise: ``3 P d`` (normalisation) + ``rounds * ceil(P/2) floor(P/2)`` (each round's max over the
    ``a`` x ``b`` similarities; the kernel keeps the residual list padded to P); ``rounds`` =
    ``len(duplicate_rounds(P - T_imp, n_keep - T_imp))``.
    """
    important = important_count(n_keep, important_ratio)
    rounds = len(duplicate_rounds(P - important, n_keep - important))
    return KernelFlops(2.0 * P * P * d, 3.0 * P * d + rounds * ((P + 1) // 2) * (P // 2))

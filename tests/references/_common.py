"""Input handling shared by the references: float64 arrays, unit rows, cosine matrices, budget checks."""

import numpy as np


def float64(array, name: str, ndim: int) -> np.ndarray:
    """`array` (numpy or a CPU torch tensor) as a float64 numpy array of `ndim` dimensions."""
    if hasattr(array, "detach"):  # a torch tensor: numpy cannot read bfloat16 directly
        array = array.detach().cpu().double().numpy()
    out = np.asarray(array, dtype=np.float64)
    if out.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {out.shape}")
    if not np.isfinite(out).all():
        raise ValueError(f"{name} holds NaN or inf: pass one sample's real tokens only, without padding")
    return out


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its Euclidean norm (the references divide without an epsilon too)."""
    return matrix / np.linalg.norm(matrix, axis=-1, keepdims=True)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """cos(a_i, b_j) for every row pair: [len(a), len(b)]."""
    return unit_rows(a) @ unit_rows(b).T


def checked_budget(n_keep, n_tokens: int, name: str = "n_keep") -> int:
    """`n_keep` as an int in [1, n_tokens]."""
    n = int(n_keep)
    if n != n_keep or not 1 <= n <= n_tokens:
        raise ValueError(f"{name} must be an integer in [1, {n_tokens}] (the sample's token count), got {n_keep}")
    return n


def sorted_indices(indices) -> np.ndarray:
    """Kept indices as a sorted int64 array; a repeated index is a bug in the caller."""
    out = np.sort(np.asarray(list(indices), dtype=np.int64))
    if len(np.unique(out)) != len(out):
        raise AssertionError(f"an index was selected twice: {out.tolist()}")
    return out

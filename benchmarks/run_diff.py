"""How far apart two run folders of ``analysis.compare`` are: the check that a GPU run's tables equal the CPU's.

    python -m benchmarks.run_diff reports/default gpu-results/default-cuda

For ``summary.csv`` and ``correlation.csv``: the largest absolute difference of each numeric column
(rows matched on their key columns); for ``samples.parquet``: the share of (sample, method, keep) rows
with the same answer, and the largest differences of KL, forced KL and JS; for ``spectra.parquet``: the
largest relative difference of IPR and PR. Answers that differ are expected only where two candidate
tokens' logits are within float rounding of each other (bfloat16 on a GPU: often); the script reports,
it does not judge.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

KEYS = {"summary.csv": ["method", "keep"], "correlation.csv": ["level", "layer", "group", "measure"]}
SAMPLE_KEYS = ["sample_id", "method", "keep"]
SPECTRUM_KEYS = ["sample_id", "method", "keep", "layer", "group"]


def _read(folder: Path, name: str) -> pd.DataFrame:
    path = folder / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: pass two run folders of python -m analysis.compare")
    return pd.read_csv(path) if name.endswith(".csv") else pd.read_parquet(path)


def column_differences(a: pd.DataFrame, b: pd.DataFrame, keys: list[str]) -> pd.Series:
    """max |a - b| of every numeric non-key column, rows matched on ``keys`` (NaN in both counts as equal)."""
    merged = a.merge(b, on=keys, suffixes=("_a", "_b"), how="outer", indicator=True)
    if (merged["_merge"] != "both").any():
        raise ValueError(f"the two runs hold different rows ({keys}): they are not the same job")
    numeric = [c for c in a.columns if c not in keys and pd.api.types.is_numeric_dtype(a[c])]
    out = {}
    for c in numeric:
        x, y = merged[f"{c}_a"].to_numpy(float), merged[f"{c}_b"].to_numpy(float)
        both_nan = np.isnan(x) & np.isnan(y)
        diff = np.where(both_nan, 0.0, np.abs(x - y))
        out[c] = float(np.nan_to_num(diff, nan=np.inf).max()) if len(diff) else 0.0
    return pd.Series(out, dtype=float)


def run_diff(a: Path, b: Path) -> dict[str, pd.Series | float]:
    """Every difference the module docstring lists, by table."""
    result: dict[str, pd.Series | float] = {}
    for name, keys in KEYS.items():
        result[name] = column_differences(_read(a, name), _read(b, name), keys)
    samples = _read(a, "samples.parquet").merge(_read(b, "samples.parquet"), on=SAMPLE_KEYS, suffixes=("_a", "_b"))
    result["same_answer"] = float((samples["answer_a"] == samples["answer_b"]).mean())
    result["samples.parquet"] = pd.Series({c: float((samples[f"{c}_a"] - samples[f"{c}_b"]).abs().max())
                                           for c in ("kl", "forced_kl", "js")})
    spectra = _read(a, "spectra.parquet").merge(_read(b, "spectra.parquet"), on=SPECTRUM_KEYS, suffixes=("_a", "_b"))
    result["spectra.parquet"] = pd.Series({
        c: float(((spectra[f"{c}_a"] - spectra[f"{c}_b"]).abs() / spectra[f"{c}_a"].abs().clip(lower=1e-12)).max())
        for c in ("ipr", "pr")})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    try:
        result = run_diff(args.a, args.b)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"same answer: {result['same_answer']:.2%} of (sample, method, keep) rows")
    for name in (*KEYS, "samples.parquet"):
        print(f"{name}: largest absolute difference per column\n{result[name].to_string()}")
    print(f"spectra.parquet: largest relative difference\n{result['spectra.parquet'].to_string()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

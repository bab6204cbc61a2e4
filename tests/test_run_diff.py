"""benchmarks/run_diff.py: the check that a GPU run's tables equal the CPU run's."""

import shutil
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.run_diff import main, run_diff

DEFAULT = Path(__file__).resolve().parents[1] / "reports" / "default"
TABLES = ("summary.csv", "correlation.csv", "samples.parquet", "spectra.parquet")


@pytest.fixture
def copy(tmp_path):
    for name in TABLES:
        shutil.copy(DEFAULT / name, tmp_path / name)
    return tmp_path


def test_a_run_is_no_distance_from_itself(copy):
    result = run_diff(DEFAULT, copy)
    assert result["same_answer"] == 1.0
    for name in ("summary.csv", "correlation.csv", "samples.parquet", "spectra.parquet"):
        assert (result[name] == 0).all(), name


def test_changed_numbers_and_answers_are_found(copy):
    summary = pd.read_csv(copy / "summary.csv")
    summary.loc[3, "mean_kl"] += 0.25
    summary.to_csv(copy / "summary.csv", index=False)
    samples = pd.read_parquet(copy / "samples.parquet")
    samples.loc[:9, "answer"] = "changed"
    samples.loc[0, "js"] += 0.5
    samples.to_parquet(copy / "samples.parquet")
    spectra = pd.read_parquet(copy / "spectra.parquet")
    spectra.loc[0, "ipr"] *= 1.01
    spectra.to_parquet(copy / "spectra.parquet")
    result = run_diff(DEFAULT, copy)
    assert result["summary.csv"]["mean_kl"] == pytest.approx(0.25)
    assert result["summary.csv"].drop("mean_kl").eq(0).all()
    assert result["same_answer"] == pytest.approx(1 - 10 / len(samples))
    assert result["samples.parquet"]["js"] == pytest.approx(0.5)
    assert result["spectra.parquet"]["ipr"] == pytest.approx(0.01, rel=1e-6)


def test_different_jobs_and_missing_tables_are_one_line(copy, tmp_path, capsys):
    summary = pd.read_csv(copy / "summary.csv")
    summary.iloc[:-1].to_csv(copy / "summary.csv", index=False)
    assert main([str(DEFAULT), str(copy)]) == 2
    assert "not the same job" in capsys.readouterr().err
    assert main([str(DEFAULT), str(tmp_path / "nowhere")]) == 2
    assert "is missing" in capsys.readouterr().err

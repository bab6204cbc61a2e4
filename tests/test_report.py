"""What the report says: no claim the conditions cannot support, tables in the units the text uses."""

import pandas as pd

from analysis.study import report

SUMMARY = pd.DataFrame([
    {"method": m, "keep": k, "n": 150, "accuracy": a, "baseline_accuracy": 0.86, "flip_rate": f, "flip_low": f / 2,
     "flip_high": 2 * f, "dutta_flips": f,
     "c_to_i": 3, "i_to_c": 1, "mean_kl": 0.1, "mean_js": 0.01, "mean_forced_kl": 0.1, "mean_delta_ipr": d,
     "rel_flops": r, "rel_flops_llm": r, "tokens_kept": t}
    for m, k, a, f, d, r, t in [("lofi", 0.5, 0.86, 0.0, -0.04, 0.70, 72.0),
                                ("lofi", 0.1, 0.873, 0.053, -0.06, 0.49, 15.0),
                                ("fastv", 0.5, 0.833, 0.027, -0.02, 0.70, 72.0)]])


def _correlation(n, pearson=0.99, low=0.9, high=1.0, p=0.33):
    return pd.DataFrame([{"level": "condition", "layer": 8, "group": "all", "measure": m, "n": n, "pearson": pearson,
                          "pearson_low": low, "pearson_high": high, "spearman": 1.0, "spearman_low": 1.0,
                          "spearman_high": 1.0, "resamples": 1000, "pearson_p": p, "spearman_p": p}
                         for m in ("flip", "kl")])


def test_three_conditions_make_no_claim_about_the_correlation():
    lines = [str(line) for line in report.reading(SUMMARY, _correlation(3), 8, "all")]
    said = " ".join(lines)
    assert "This run has 3 conditions" in said and "cannot show" in said and "0.33" in said
    assert "excludes" not in said and "unlikely to be chance" not in said


def test_enough_conditions_report_the_permutation_p_and_only_then_a_relation():
    strong = " ".join(map(str, report.reading(SUMMARY, _correlation(9, p=0.004), 8, "all")))
    assert "Across 9 conditions" in strong and "p = 0.004" in strong and "unlikely to be chance" in strong
    weak = " ".join(map(str, report.reading(SUMMARY, _correlation(9, p=0.2), 8, "all")))
    assert "not distinguishable from chance" in weak and "unlikely" not in weak


def test_tables_use_the_texts_units_and_define_every_column():
    columns = {c: (h, f) for c, (h, f, _) in report.SUMMARY_COLUMNS.items()}
    table = str(report._table(SUMMARY, columns))
    assert "<th>accuracy (%)</th>" in table and "<td>87.3</td>" in table and "0.873" not in table
    assert "<td>72</td>" in table and "72.000" not in table
    assert "KL (nats)" in table and "C\u2192I" in table
    assert set(report.SUMMARY_COLUMNS) >= set(SUMMARY.columns)
    assert all(definition for _, _, definition in report.SUMMARY_COLUMNS.values())
    text = " ".join(map(str, report.reading(SUMMARY, _correlation(9), 8, "all")))
    assert "accuracy moves from 86.0% to 87.3%" in text  # the table above prints the same 87.3


def test_the_committed_default_run_recomputes_to_the_same_tables_and_page():
    """Every table and number the committed report shows comes out of its own shards' successors, the
    parquet tables, unchanged: the code that writes them has not drifted from what is committed."""
    import json
    from pathlib import Path

    from analysis.study import tables

    run = Path(__file__).resolve().parents[1] / "reports" / "default"
    config = json.loads((run / "config.json").read_text())
    samples, spectra = pd.read_parquet(run / "samples.parquet"), pd.read_parquet(run / "spectra.parquet")
    pruned = samples.assign(changed_correctness=(samples.correct != samples.baseline_correct).astype(float))
    layer, group = tables.headline(spectra, config)
    summary = tables.summary_frame(pruned, spectra, layer, group)
    correlation = tables.correlation_frame(pruned, spectra, seed=config["seed"])
    committed_summary, committed_correlation = pd.read_csv(run / "summary.csv"), pd.read_csv(run / "correlation.csv")
    pd.testing.assert_frame_equal(summary, committed_summary, check_dtype=False, rtol=1e-12)
    pd.testing.assert_frame_equal(correlation, committed_correlation, check_dtype=False, rtol=1e-12)
    page = report.page_html(run, config, committed_summary, committed_correlation, layer, group)
    assert page == (run / "report.html").read_text()

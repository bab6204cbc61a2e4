"""The arithmetic behind benchmarks/lvpruning_matched.py (matched keeps, the decision modules' FLOPs share, the
paired McNemar test) and benchmarks/cdpruner_relevance.py (kept-set overlaps), and the benchmarks' command lines."""

import os
from itertools import combinations
from math import comb, isnan

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import jaccard as jaccard_distance

import lofi
from analysis.study.tables import relative_flops
from benchmarks import cdpruner_relevance
from benchmarks.lvpruning_matched import flops_share, matched_keep, mcnemar
from benchmarks.shapes import N_TEXT, shape_config


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs():
    a = pd.Series([True] * 1 + [False] * 9 + [True] * 5 + [False] * 20)
    b = pd.Series([False] * 1 + [True] * 9 + [True] * 5 + [False] * 20)
    assert mcnemar(a, b) == pytest.approx(2 * (comb(10, 0) + comb(10, 1)) / 2 ** 10)
    assert mcnemar(a, a) == 1.0


@pytest.mark.parametrize("shape", ["llava-7b", "mid"])
def test_flops_share_gives_random_the_same_flops_with_and_without_the_modules(shape):
    config, n = shape_config(shape), 576
    (row,) = flops_share(config, shape, [0.5], N_TEXT, n)
    assert 0 < row["decision_share"] < row["rel_flops"] < 1
    assert row["random_keep_if_free"] < row["random_keep"]
    for keep, target in [(row["random_keep"], row["rel_flops"]),
                         (row["random_keep_if_free"], row["rel_flops"] - row["decision_share"])]:
        cost = relative_flops(config, lofi.build("random", keep=keep), N_TEXT, n)[0]
        one_token = relative_flops(config, lofi.build("random", keep=keep + 1 / n), N_TEXT, n)[0] - cost
        assert abs(cost - target) <= one_token  # keeps count whole tokens


def test_a_budget_below_one_token_has_no_matched_keep():
    config = shape_config("mid")
    one_token = relative_flops(config, lofi.build("random", keep=1 / 576), N_TEXT, 576)[0]
    assert isnan(matched_keep(config, "random", one_token - 0.01, N_TEXT, 576))  # not a clamped keep
    assert matched_keep(config, "random", one_token + 0.01, N_TEXT, 576) > 1 / 576


def test_the_prefill_profile_counts_what_pruning_adds(capsys):
    """benchmarks/profile_prefill.py on a small model on the CPU: both kinds profiled, and the pruned one
    dispatches FastV's extra work (its attention rows) on top of fewer tokens."""
    import re

    from benchmarks.profile_prefill import main

    main(["--shape", "overhead", "--text-layers", "4", "--vision-layers", "1", "--rows", "3"])
    out = capsys.readouterr().out
    counts = [int(n) for n in re.findall(r"aten op calls \(nested included\) (\d+)", out)]
    assert "== unpruned" in out and "== fastv keep=0.25" in out and len(counts) == 2
    assert counts[1] > counts[0] > 0


def test_the_op_counts_split_the_prefill_between_model_and_runtime_and_place_the_syncs(capsys):
    """benchmarks/op_counts.py on a small model on the CPU: the model dispatches the same ops pruned or not, the
    runtime's ops and its one host read are its own, and every sync is placed in the prefill."""
    from benchmarks.op_counts import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # counting needs no parallelism; on a busy 2-core machine spinning threads cost seconds
    try:
        results = main(["--shape", "overhead", "--text-layers", "4", "--vision-layers", "1", "--methods", "fastv",
                        "--keep", "1", "0.25"])
    finally:
        torch.set_num_threads(threads)
    base, whole, pruned = results["unpruned"], results["fastv keep=1.0"], results["fastv keep=0.25"]
    assert base.runtime == 0 and not base.runtime_syncs()
    assert base.model == whole.model == pruned.model > 0
    assert 0 < whole.runtime < pruned.runtime and pruned.by_file["attention.py"] > 0
    assert [call for _, call, _, _ in pruned.runtime_syncs()] == ["cpu"]
    assert all(where for *_, where in base.syncs + pruned.syncs)
    assert "runtime ops by file" in capsys.readouterr().out


def test_the_cudagraph_evidence_collects_the_skips_inside_its_block_only():
    """benchmarks/cudagraphs.py: inductor's skip counter and its 'skipping cudagraphs' warnings, as inductor emits
    them, are collected inside the block (and not after it); a profile's graph and kernel launches are told apart."""
    from types import SimpleNamespace

    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    from benchmarks.cudagraphs import evidence, launch_counts

    with evidence() as found:
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (1 instances)")
    log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to cpu device (after the block)")
    assert found.skips == 1 and found.messages == ["skipping cudagraphs due to mutated inputs (1 instances)"]
    assert "1 skipped" in found.summary() and "mutated inputs" in found.summary()
    assert found.tree == torch.cuda.is_available()
    events = [SimpleNamespace(key=k, count=n) for k, n in
              [("cudaGraphLaunch", 3), ("cudaLaunchKernel", 5), ("cuLaunchKernel", 2), ("aten::mm", 9)]]
    assert launch_counts(events) == {"graph launches": 3, "kernel launches": 7}


def test_the_static_cudagraph_checks_tell_a_graph_that_mutates_its_input_from_one_that_does_not():
    """benchmarks/cudagraphs.py's static_checks, on the CPU: inductor's checks before CUDA graphs, evaluated on each
    compiled graph with the CPU standing for the GPU; and inductor is left as it was."""
    from torch._inductor import cudagraph_utils, output_code

    from benchmarks.cudagraphs import static_checks

    def mutates(x, y):
        x.add_(1)
        return x * y

    def pure(x, y):
        return x * y + 1

    before = (cudagraph_utils.check_lowering_disable_cudagraph, output_code.cudagraph_post_compile,
              output_code.CompiledFxGraph.post_compile)
    with static_checks() as found:
        for function in (mutates, pure):
            torch.compile(function, mode="reduce-overhead", dynamic=False)(torch.ones(3), torch.ones(3))
    assert [reasons for _, reasons in found] == [["mutates 1 non-static inputs"], []]
    assert before == (cudagraph_utils.check_lowering_disable_cudagraph, output_code.cudagraph_post_compile,
                      output_code.CompiledFxGraph.post_compile)


def test_a_timed_module_is_timed_inside_the_block_only():
    """prefill.py's vision-tower timer: every call inside the block counts, nothing stays hooked."""
    import time

    import torch

    from benchmarks.prefill import Stopwatch, timed_module

    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.02)
            return x

    module, watch = Slow(), Stopwatch(cuda=False)
    with timed_module(module, watch):
        module(torch.zeros(1))
        module(torch.zeros(1))
    module(torch.zeros(1))  # outside: not counted
    assert watch.spans == 2 and watch.seconds >= 0.04
    assert not module._forward_hooks and not module._forward_pre_hooks
    with pytest.raises(ZeroDivisionError), timed_module(module, watch):
        1 / 0
    assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.fixture
def one_thread():
    """Small models' ops take microseconds: on a loaded machine two threads' barriers cost 10-100 times more."""
    from lofi.threads import single_threaded
    with single_threaded():
        yield


def test_the_generate_benchmark_splits_each_run_into_prefill_and_steps(capsys, one_thread):
    """benchmarks/generate.py on a small model on the CPU: one stamp per generated token, keep = 1 generates the
    baseline's tokens with its cache, and a pruned cache is smaller."""
    from benchmarks.generate import StepClock, main

    rows = main(["--shape", "overhead", "--text-layers", "3", "--vision-layers", "1", "--new-tokens", "4",
                 "--repeats", "1", "--methods", "fastv", "--keep", "1", "0.25", "--device", "cpu"])
    keep_all, pruned = rows
    assert keep_all["same_tokens"] == 1.0 and keep_all["kv_mb_pruned"] == keep_all["kv_mb_base"]
    assert keep_all["identical_logits"] and keep_all["first_logits_max_diff"] == 0
    assert pruned["kv_mb_pruned"] < pruned["kv_mb_base"]
    assert not pruned["identical_logits"] and pruned["first_logits_max_diff"] > 0
    # two unpruned runs on the CPU: the same kernels, the same sums
    assert all(row["same_tokens_control"] == 1.0 and row["identical_logits_control"]
               and row["first_logits_max_diff_control"] == 0 for row in rows)
    assert all(row[f"{kind}_ms_{run}"] > 0 for row in rows for kind in ("first_token", "step", "total")
               for run in ("base", "pruned"))
    assert "| fastv" in capsys.readouterr().out
    from _tiny import make_inputs, tiny_llava
    from transformers import StoppingCriteriaList

    clock = StepClock(cuda=False)
    clock.start()
    tiny_llava().generate(**make_inputs(), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                          stopping_criteria=StoppingCriteriaList([clock]))
    assert len(clock.stamps) == 1 + 5 and clock.stamps == sorted(clock.stamps)
    clock.stamps = [0.0, 0.5, 0.6, 0.8]
    assert clock.split() == pytest.approx((0.5, 0.15))
    clock.stamps = [0.0, 0.5]
    with pytest.raises(ValueError, match="at least two new tokens"):
        clock.split()


def test_generate_agreement_counts_equal_tokens_and_the_first_steps_largest_logit_difference():
    """``agreement`` by hand: 2 prompt tokens, 3 generated, one of the 6 generated tokens differs; the first
    step's logits differ by 0.25 at one place, later steps not at all. ``smallest_top2_gap`` by hand: gaps 0.5
    and 8 in one step, 3 in the next."""
    from types import SimpleNamespace

    from benchmarks.generate import agreement, smallest_top2_gap

    logits = (torch.zeros(2, 5), torch.ones(2, 5), torch.ones(2, 5))
    reference = SimpleNamespace(sequences=torch.tensor([[9, 9, 1, 2, 3], [9, 9, 4, 5, 6]]), logits=logits)
    moved = (logits[0].clone().index_put_((torch.tensor([1]), torch.tensor([3])), torch.tensor(-0.25)), *logits[1:])
    other = SimpleNamespace(sequences=torch.tensor([[9, 9, 1, 2, 3], [9, 9, 4, 7, 6]]), logits=moved)
    assert agreement(reference, other, 2) == (pytest.approx(5 / 6), False, 0.25)
    assert agreement(reference, reference, 2) == (1.0, True, 0.0)
    assert agreement(reference, SimpleNamespace(sequences=reference.sequences, logits=moved), 2)[1] is False
    two_steps = SimpleNamespace(logits=(torch.tensor([[3.0, 1.0, 2.5], [0.0, 9.0, 1.0]]),
                                        torch.tensor([[0.0, 4.0, 1.0]])))
    assert smallest_top2_gap(two_steps) == 0.5


def test_generate_deterministic_sets_deterministic_kernels_and_restores_the_settings(monkeypatch, one_thread):
    """``--deterministic``: deterministic algorithms (warn only), cuDNN without benchmarking and, for CUDA, the
    cuBLAS workspace setting while active; everything as it was after, also after an exception. With CUDA
    already started under another cuBLAS setting it refuses, naming the fix."""
    from benchmarks.generate import deterministic, main

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    with pytest.raises(ZeroDivisionError), deterministic(cuda=True):
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        1 / 0
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="CUBLAS_WORKSPACE_CONFIG=:4096:8 before CUDA starts"):
        with deterministic(cuda=True):
            pass
    monkeypatch.undo()
    rows = main(["--shape", "overhead", "--text-layers", "3", "--vision-layers", "1", "--new-tokens", "2",
                 "--repeats", "1", "--methods", "lofi", "--keep", "1", "--device", "cpu", "--deterministic"])
    assert rows[0]["identical_logits"] and rows[0]["identical_logits_control"]
    assert torch.are_deterministic_algorithms_enabled() == before[0]


def test_the_step_ops_benchmark_counts_a_decoding_steps_ops_and_the_runtimes_share(one_thread):
    """benchmarks/step_ops.py on a small model on the CPU: a decoding step after a pruned prompt dispatches the
    unpruned step's ops and the runtime's few, listed by the line that ran them."""
    from benchmarks.step_ops import main

    rows = main(["--shape", "overhead", "--text-layers", "3", "--vision-layers", "1", "--batch", "2", "--new-tokens",
                 "3", "--repeats", "1", "--methods", "fastv", "--device", "cpu"])
    unpruned, fastv = rows
    assert unpruned["runtime_ops_per_step"] == 0 and 0 < fastv["runtime_ops_per_step"] <= 2
    assert fastv["model_ops_per_step"] == unpruned["model_ops_per_step"] > 100
    assert fastv["step_ms"] > 0 and "device_ms_per_step" not in fastv


def test_the_gpu_scripts_dry_run_shrinks_each_command_to_the_cpu():
    """``DRY=1 bash benchmarks/gpu.sh``: every command on the CPU, small, the rest of its words unchanged."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "gpu.sh"
    shrink = script.read_text().split("\nshrink() {", 1)[1].split("\n}\n", 1)[0]

    def shrunk(command: str) -> str:
        run = subprocess.run(["bash", "-c", f"shrink() {{{shrink}\n}}\nshrink {command} | tr '\\n' ' '"],
                             capture_output=True, text=True, check=True)
        return run.stdout.strip()

    assert shrunk("python3 -m benchmarks.prefill --shape qwen2-vl-7b --device cuda --dtype bfloat16 --batch 16 "
                  "--repeats 3") == ("python3 -m benchmarks.prefill --shape qwen2-vl-7b --text-layers 4 "
                                     "--vision-layers 1 --device cpu --dtype float32 --batch 2 --repeats 1")
    assert shrunk("python3 -m benchmarks.capture_overhead --shape llava-1.5-7b --device cuda --batch 8") == (
        "python3 -m benchmarks.capture_overhead --shape llava-1.5-7b --text-layers 4 --device cpu --batch 2")
    assert shrunk("python3 -m benchmarks.generate --device cuda --new-tokens 32") == (
        "python3 -m benchmarks.generate --device cpu --new-tokens 4")
    assert shrunk("python3 -m analysis.compare --methods lofi --device cuda --out x") == (
        "python3 -m analysis.compare --methods lofi --device cpu --out x")


def test_the_prefill_benchmark_prints_a_row_per_condition(capsys):
    """benchmarks/prefill.py on a small model on the CPU: one row per (method, keep), keep = 1 keeps every
    visual token at the unpruned FLOPs, and a pruned prefill holds a smaller KV cache."""
    from benchmarks.prefill import main

    rows = main(["--shape", "overhead", "--text-layers", "3", "--vision-layers", "1", "--repeats", "1",
                 "--methods", "fastv", "--keep", "1", "0.25", "--device", "cpu"])
    keep_all, pruned = rows
    assert (keep_all["keep"], keep_all["kept"], keep_all["flops_speedup"]) == (1.0, 64, 1.0)
    assert keep_all["kv_mb_pruned"] == keep_all["kv_mb_base"] > pruned["kv_mb_pruned"]
    assert pruned["kept"] == 16 and pruned["flops_speedup"] > 1
    assert all(row["baseline_ms"] > 0 and row["pruned_ms"] > 0 for row in rows)
    assert "| fastv" in capsys.readouterr().out


def test_kept_set_jaccard_matches_scipy():
    a, b = [0, 3, 5, 9], [3, 4, 5]
    indicator = lambda kept: np.isin(np.arange(10), kept)  # noqa: E731
    expected = 1 - jaccard_distance(indicator(a), indicator(b))
    assert cdpruner_relevance.jaccard(a, b) == pytest.approx(expected) == pytest.approx(2 / 5)
    assert cdpruner_relevance.jaccard([], []) == 1.0


@pytest.mark.parametrize("n,k", [(6, 2), (7, 4), (5, 5)])
def test_chance_jaccard_is_the_mean_over_every_pair_of_subsets(n, k):
    subsets = list(combinations(range(n), k))
    exact = np.mean([cdpruner_relevance.jaccard(a, b) for a in subsets for b in subsets])
    assert cdpruner_relevance.chance_jaccard(n, k) == pytest.approx(exact, abs=1e-12)


@pytest.mark.parametrize("argv,message", [(["--variants", "negative"], "valid variants: default, none"),
                                          (["--keep", "1.5"], "fractions in (0, 1]"),
                                          (["--out", "table.json"], ".csv or .parquet")])
def test_the_cdpruner_relevance_benchmark_refuses_bad_input_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cdpruner_relevance.main(argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error


@pytest.mark.slow
def test_the_cdpruner_relevance_benchmark_compares_each_variant_with_the_default(tmp_path, capsys):
    out = tmp_path / "relevance.csv"
    table = cdpruner_relevance.main(["--limit", "4", "--keep", "0.1", "--variants", "none", "--no-progress",
                                     "--out", str(out)])
    assert table["variant"].tolist() == ["default", "none"]
    default = table.iloc[0]
    assert (default["jaccard"], default["identical"], default["changed_vs_default"]) == (1.0, 100.0, 0.0)
    assert 0 <= table.iloc[1]["jaccard"] < 1  # no relevance: another choice on these questions
    pd.testing.assert_frame_equal(pd.read_csv(out), table)
    assert "| none" in capsys.readouterr().out


def test_the_schedule_choices_run_through_the_runtime_on_a_tiny_model(tiny_model):
    """Every choice of benchmarks/lvpruning_schedule.py prunes a real batch (its tie-breaking draws need the
    runtime's per-sample fingerprints, which the runtime computes only for methods that declare ``draws``)."""
    from analysis.benchmark.datasets import load_split
    from analysis.study.evaluate import load_model
    from analysis.study.models import batch_inputs
    from benchmarks.lvpruning_schedule import ScheduleChoice, answer_batch
    from lofi.methods.lvpruning import LVPruning
    model, processor = load_model(tiny_model)
    inputs = batch_inputs(processor, load_split("val", limit=3))
    schedule = LVPruning(keep=0.6)
    for rule in ("random", "lofi"):
        choice = ScheduleChoice(schedule, [1, 2, 3], rule=rule)
        choice.priority = torch.zeros(3, 16)
        answers, handle = answer_batch(model, processor, inputs, choice)
        assert len(answers) == 3 and [k.shape[1] for k in handle.kept] == [10, 7, 4]  # ceil([.6, .4, .2] x 16)


def test_the_capture_benchmark_measures_ipr_pr_and_spectra_on_a_share_of_samples(capsys):
    """benchmarks/capture_overhead.py on a small model: one line per mode with its overhead and op counts;
    the subset mode says how many samples it decomposed (each pass's rows get new ids: here the one timed
    pass after the warm-up, ids 4-7) and dispatches more ops than IPR/PR alone (one sample decomposed)."""
    import re

    from analysis.measure.capture import in_subset
    from benchmarks.capture_overhead import main

    main(["--shape", "overhead", "--text-layers", "2", "--vision-layers", "1", "--batch", "4", "--repeats", "1",
          "--block", "1",
          "--modes", "ipr-pr", "last-layer-subset", "--spectra-share", "0.5"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(lines) == {"ipr-pr", "last-layer-subset"} and all("overhead" in line for line in lines.values())
    expected = sum(in_subset(i, 0.5, 0) for i in range(4, 8))
    assert f"spectra on {expected} of 4 samples" in lines["last-layer-subset"]
    ops = {name: int(re.search(r"ops per pass (\d+)", line).group(1)) for name, line in lines.items()}
    assert ops["last-layer-subset"] > ops["ipr-pr"] > 0

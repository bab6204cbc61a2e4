"""analysis: what visual-token pruning changes, measured.

    python -m analysis.compare --methods lofi lvpruning fastv      # the study, into a run folder

The package is four parts (docs/definitions.md defines every quantity and file):

* ``analysis.measure`` -- measurement: streaming hidden-state spectra (``Capture``), consistency with the
  unpruned model (flips, KL, JS), and the correlation of the two; pure functions and hooks.
* ``analysis.study`` -- the comparison pipeline: loading any supported model (``load_model``), one condition
  over a split (``run_condition``), the run folder, its tables, report and figures.
* ``analysis.benchmark`` -- the bundled shapes benchmark's generator and the split loader (``load_split``).
* ``analysis.bundled`` -- the bundled model's recipe, its training and LVPruning's, and its card.

The commands are ``python -m analysis.<compare|report|evaluate|shapes|train_bundled|train_lvpruning|
model_card>``. The names below are the public face; everything else is reachable by its module.
"""

from analysis.benchmark.datasets import DatasetError, Sample, load_split
from analysis.measure import spectral
from analysis.measure.capture import Capture, CaptureOptions, LayerStatistics
from analysis.measure.consistency import accuracy, flips, forced_kl, js_divergence, kl_divergence, normalize_answer
from analysis.measure.correlation import Correlation, condition_correlation, permutation_p, sample_correlation
from analysis.study.models import ModelError, batch_inputs, check_model, load_model, prompt
from analysis.study.records import ConditionResult, KeptTokens, RunConfig, SampleResult
from analysis.study.runner import run_condition

__all__ = [
    "Capture", "CaptureOptions", "LayerStatistics", "spectral",
    "flips", "kl_divergence", "js_divergence", "forced_kl", "accuracy", "normalize_answer",
    "Correlation", "condition_correlation", "sample_correlation", "permutation_p",
    "load_model", "check_model", "batch_inputs", "prompt", "ModelError",
    "run_condition", "ConditionResult", "SampleResult", "KeptTokens", "RunConfig",
    "load_split", "Sample", "DatasetError",
]

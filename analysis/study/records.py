"""The typed records a comparison produces, and the table columns that come from them.

A ``Condition`` (method, keep; ``BASELINE`` for the unpruned model) is the one key of a comparison's
shards, records and table rows. One ``SampleResult`` per (sample, condition), one ``KeptTokens`` per
(sample, condition, stage); the run folder's tables (docs/definitions.md#run-folder) are these records as
rows, with the columns ``analysis.study.tables`` derives from them added. ``RunConfig`` is ``config.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch


@dataclass(frozen=True)
class Condition:
    """One condition of a comparison: a method's registry name and its keep (``BASELINE``: the unpruned
    model). Its shards are named by ``stem``; its rows carry ``method`` and ``keep`` as columns."""

    method: str
    keep: float

    @classmethod
    def of(cls, method) -> "Condition":
        """The condition of a built ``lofi.PruningMethod`` (None: the unpruned model)."""
        return BASELINE if method is None else cls(method.name, method.keep)

    @property
    def stem(self) -> str:
        return f"{self.method}__{self.keep:g}"

    def __str__(self) -> str:
        return f"{self.method} keep={self.keep:g}"


BASELINE = Condition("baseline", 1.0)


@dataclass
class SampleResult:
    """What one condition did to one sample.

    Attributes:
        sample_id, family, question, gold: the benchmark's sample (``gold`` None without ground truth).
        method, keep: the condition (``baseline`` and 1.0 for the unpruned model).
        answer, baseline_answer: normalised greedy answers, pruned and unpruned.
        correct, baseline_correct: answer == gold (None without gold).
        flip: answer != baseline_answer.
        kl, js, forced_kl: divergences from the unpruned model, nats (docs/definitions.md#consistency).
        image: the family's image description as JSON (e.g. LLaVA-NeXT's [height, width]).
        n_visual, n_prunable, n_text: the prompt's visual tokens (newline rows included), those a method
            may drop, and its text tokens.
    """

    sample_id: str
    method: str
    keep: float
    family: str
    question: str
    gold: str | None
    answer: str
    baseline_answer: str
    correct: bool | None
    baseline_correct: bool | None
    flip: bool
    kl: float = 0.0
    forced_kl: float = 0.0
    js: float = 0.0
    image: str = "null"
    n_visual: int = 0
    n_prunable: int = 0
    n_text: int = 0


@dataclass
class KeptTokens:
    """The visual tokens one sample kept after one stage of one condition.

    Attributes:
        sample_id, method, keep: sample and condition.
        stage, layer: the stage and the decoder layer it prunes at.
        kept: kept visual-token indices, increasing (docs/definitions.md#pruning).
        n_visual: the sample's visual tokens (newline rows included).
        tiles: where its visual tokens lie on the image, JSON (``lofi.families.Tile`` fields).
        merged_from, merged_into: a merging method's dropped tokens that were merged into a kept one, and that
            kept token, pairwise (visual-token indices; empty for the other methods).
    """

    sample_id: str
    method: str
    keep: float
    stage: int
    layer: int
    kept: list[int]
    n_visual: int
    tiles: str
    merged_from: list[int] = field(default_factory=list)
    merged_into: list[int] = field(default_factory=list)


@dataclass
class BaselineOutputs:
    """What every pruned condition is compared with, per sample (kept in memory and on disk)."""

    answers: list[str]
    first_logits: torch.Tensor                    # [N, vocab] float32
    sequences: list[list[int]]                    # prompt ids + generated ids, unpadded
    answer_lengths: list[int]                     # answer tokens before EOS
    forced_logits: list[torch.Tensor] = field(default_factory=list)  # per sample [answer_len, vocab]


@dataclass
class ConditionResult:
    """Everything one condition measured: per-sample results, per-layer statistics, kept tokens, and for
    the unpruned condition the outputs the others are compared with."""

    samples: list[SampleResult]
    spectra: list  # analysis.measure.capture.LayerStatistics, with sample ids
    kept: list[KeptTokens]
    baseline: BaselineOutputs | None = None


@dataclass
class RunConfig:
    """``config.json`` of a run folder: every argument, resolved defaults, what the run read (fingerprints)
    and provenance.

    Attributes (besides the command's options):
        dataset_sha256: ``analysis.benchmark.datasets.content_sha256`` of the questions and images used.
        chat_template_sha256: sha256 of the processor's chat template (None without one).
        weights: sha256 per weights file read (the model's safetensors, a method's trained modules).
        model_files: sha256 per configuration, tokenizer and processor file of the model folder.
        method_defaults: each method's settings (its ``repr`` at the first keep).
        spectra_share: ``--spectra-subset`` resolved: the share of samples whose spectra are decomposed
            (chosen by ``seed`` and their ids; docs/definitions.md#spectral).
        packages, python, git_commit: provenance.
    """

    methods: list[str]
    keep: list[float]
    model: str
    dataset: str
    limit: int
    n_samples: int
    seed: int
    device: str
    batch_size: int
    max_new_tokens: int
    center: bool
    spectrum_layers: str
    spectra_share: float
    method_defaults: dict
    weights: dict
    model_files: dict
    chat_template_sha256: str | None
    dataset_sha256: str
    headline: dict
    packages: dict
    python: str
    git_commit: str | None

    # a finished or unfinished run is reused only for the same values of these: everything that changes a
    # number. The model and dataset enter by content (fingerprints), not by how their paths are written.
    IDENTITY = ("methods", "keep", "method_defaults", "weights", "model_files", "chat_template_sha256",
                "dataset_sha256", "n_samples", "seed", "center", "max_new_tokens", "batch_size", "spectrum_layers",
                "spectra_share", "device", "packages")

    def as_dict(self) -> dict:
        return asdict(self)


def columns(record: type) -> list[str]:
    """The field names of a record type, in order: the columns of its table."""
    return [f.name for f in fields(record)]

"""Streaming capture of per-layer spectral statistics of a VLM language model's hidden states.

``Capture`` registers forward hooks on the decoder layers while its ``with`` block is active and turns
each layer's hidden states into the statistics of docs/definitions.md#spectral *as the forward pass runs*: the
hidden states are detached, cast to float32 on the model's device, reduced to a few numbers per
(sample, layer, group) and dropped, so memory does not grow with the number of samples.

Layer numbering: statistic ``layer = l`` describes the tokens decoder layer ``l`` computes on (its
input, after any pruning at ``l``); ``layer = 0`` is the language model's input embeddings (the visual
rows are the projector's output) and ``layer = L`` the last layer's output (before the final norm).
Groups: ``visual`` (the visual tokens present at that layer: image and video tokens of any family,
LLaVA-NeXT's newline rows included, as the model holds them) and ``all`` (every real token). In a ragged
batch samples hold different numbers of visual tokens; each sample's statistics are its own.

IPR and PR, at every layer for every sample, need no decomposition (``spectral.gram_moments``): per layer
one Gram matrix of the batch and three batched products give tr(G) and ||G||_F^2 of both groups of every
sample; they stay on the device until the pass ends, when one stacked reduction turns every layer's into
IPR and PR and one transfer brings everything to the host. No layer reads the device.

Spectra (singular values, effective rank) and leverage scores need decompositions: only at
``spectrum_layers`` and ``leverage_layers``, and with ``spectra_share`` < 1 only for a seeded subset of the
samples (``in_subset``: chosen by their ids, given with ``identify``), so that they cost a
bounded share of a run. Where they are decomposed (``spectra_on``): inline on the model's device, or -- the
default on a GPU -- on the host in float64, by a background thread fed at the end of each forward pass
(``analysis.measure.host_spectra``), so that decompositions do not hold up the model.

Each call is read by the model's call tracker (``lofi.calls``), which the pruning runtime shares: its
visual positions, its attention mask, and inside ``lofi.pruned(...)`` the block's ``PruningHandle``,
which says which original tokens each layer holds, so it works unchanged there. Only calls whose prompt
contains image tokens are captured (not decoding steps).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch

from analysis.measure import spectral
from analysis.measure.host_spectra import HostSpectra, spectrum_statistics
from lofi.calls import CallTracker
from lofi.families import family_for
from lofi.linalg import current_eigh_route


@dataclass
class LayerStatistics:
    """One (call row, layer, group) record.

    Attributes:
        row: index of the sample within its forward call's batch.
        call: running index of the captured forward call.
        layer, group, n_tokens: which matrix (see the module docstring).
        ipr, pr, effective_rank: spectral statistics of the matrix (docs/definitions.md#spectral).
        singular_values: the top ``top_k`` singular values (float32, descending).
        has_spectrum: whether the matrix was decomposed (its layer is a spectrum or leverage layer and its
            sample in the subset); if not, ``effective_rank`` is NaN and ``singular_values`` empty, and IPR
            and PR come from its Gram matrix's trace and Frobenius norm.
        leverage: for ``visual`` at ``leverage_layers``, on decomposed rows: per visual token present, its
            leverage score (rank at ``tau``), and ``visual_index`` the original visual-token index of each entry.
        sample_id: the id given to ``Capture.identify`` for its row (or filled in by the caller).
    """

    row: int
    call: int
    layer: int
    group: str
    n_tokens: int
    ipr: float
    pr: float
    effective_rank: float
    singular_values: list[float]
    has_spectrum: bool = False
    leverage: list[float] | None = None
    visual_index: list[int] | None = None
    sample_id: str | None = None


def check_share(share: float) -> float:
    """``share`` itself, or a ValueError naming the valid range."""
    if not 0 < share <= 1:
        raise ValueError(f"the share of samples with spectra must be in (0, 1] (1: every sample), got {share}")
    return share


def in_subset(sample_id, share: float, seed: int) -> bool:
    """Whether sample ``sample_id`` is in the seeded spectra subset of ``share`` (docs/definitions.md#spectral).

    It is when u < share, u in [0, 1) read from the first 8 bytes of sha256("<seed>:<sample id>"): the seed
    and the id alone decide -- not the batch, the position in it, or the other samples of a run -- so every
    condition of a run, a resumed run and a run on other hardware decompose the same samples. Each sample
    is in with probability ``share``: N samples give share * N of them, within a few sqrt(share (1 - share) N).
    """
    if share >= 1:
        return True
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2 ** 64


def subset_rows(sample_ids: Iterable, share: float, seed: int) -> list[int]:
    """The positions in ``sample_ids`` of the samples in the subset (``in_subset``), in order."""
    return [row for row, sample_id in enumerate(sample_ids) if in_subset(sample_id, share, seed)]


def _to_host(records: list[dict]) -> list[dict]:
    """The tensors of ``records`` on the CPU with one device-to-host copy: their bytes in one buffer, moved,
    and split back into their dtypes and shapes (widest dtypes first, so every piece stays aligned)."""
    items = sorted(((r, name, value) for r, record in enumerate(records) for name, value in record.items()),
                   key=lambda item: -item[2].element_size())
    out: list[dict] = [{} for _ in records]
    if not items:
        return out
    flat = torch.cat([value.reshape(-1).view(torch.uint8) for _, _, value in items]).cpu()
    start = 0
    for r, name, value in items:
        size = value.numel() * value.element_size()
        out[r][name] = flat[start:start + size].view(value.dtype).view(value.shape)
        start += size
    return out


def _visual_positions(is_visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([batch, P] positions of each sample's visual tokens in order, padded with 0; [batch, P] real)."""
    counts = is_visual.sum(1)
    order = torch.sort((~is_visual).to(torch.int8), dim=1, stable=True).indices[:, :int(counts.max())]
    return order, torch.arange(order.shape[1], device=order.device) < counts[:, None]


def _device_index(rows: list[int], device: torch.device) -> torch.Tensor:
    """``rows`` as an index on ``device``; on a GPU copied from pinned memory, so that the copy does not
    wait for the work already queued."""
    index = torch.tensor(rows, dtype=torch.long)
    return index.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else index.to(device)


class _Geometry:
    """The tokens one pruning stage holds in one forward pass, computed once and reused by its layers: which
    are visual and real, each group's mask [batch, groups, tokens] and size, and -- computed only for a
    visual spectrum or leverage, with one host sync for their width -- the visual tokens' positions."""

    def __init__(self, is_visual, valid, visual_rank, groups):
        self.is_visual, self.valid, self.visual_rank = is_visual, valid, visual_rank
        masks = torch.stack([is_visual if group == "visual" else valid for group in groups], 1)
        self.masks, self.counts = masks.float(), masks.sum(-1)
        self._weights: dict = {}
        self._positions = None

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """[batch, tokens, 1]: 1 at real tokens, 0 at padding, in ``dtype``."""
        if dtype not in self._weights:
            self._weights[dtype] = self.valid[..., None].to(dtype)
        return self._weights[dtype]

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._positions is None:
            self._positions = _visual_positions(self.is_visual)
        return self._positions


@dataclass(frozen=True)
class CaptureOptions:
    """What ``Capture`` measures.

    Attributes:
        groups: token groups to measure (``visual``, ``all``).
        center: subtract each matrix's mean row first (recorded by the caller in the run config).
        top_k: how many singular values to keep per matrix.
        leverage_layers: layers at which to keep per-token leverage scores of the visual group.
        tau: energy threshold of the rank used for leverage scores.
        spectrum_layers: the layers at which to decompose (singular values, effective rank):
            ``"all"`` (default), a collection of layer numbers, or ``()`` for none. Everywhere else
            IPR and PR are still exact (from Frobenius norms of the Gram matrix, no decomposition),
            effective rank is NaN and ``singular_values`` is empty. On a small model one
            decomposition costs about as much as the decoder layer itself (benchmarks/README.md).
        spectra_on: where the spectra are decomposed: ``"device"`` (inline, float32, in the forward
            pass; on a GPU with ``LOFI_EIGH=cusolver-batched``, at the pass's end, all of its Gram matrices
            of one size in one call), ``"host"`` (float64, on a background thread after the pass: the
            Gram matrices travel with the pass's other statistics; ``take`` waits for them), or ``"auto"``
            (default: host when the model is on a GPU, device otherwise). Leverage layers always decompose inline.
        spectra_share: the share of samples whose matrices are decomposed (spectra and leverage), in
            (0, 1]; 1 (default): every sample. Below 1, a sample is in when a hash of ``spectra_seed`` and
            its id falls below the share (``in_subset``): the ids come from
            ``Capture.identify`` before each captured pass. IPR and PR stay exact on every sample.
        spectra_seed: the seed of that choice.
    """

    groups: tuple[str, ...] = ("visual", "all")
    center: bool = False
    top_k: int = 32
    leverage_layers: tuple[int, ...] = ()
    tau: float = 0.9
    spectrum_layers: str | tuple[int, ...] = "all"
    spectra_on: str = "auto"
    spectra_share: float = 1.0
    spectra_seed: int = 0

    def __post_init__(self):
        unknown = set(self.groups) - {"visual", "all"}
        if unknown:
            raise ValueError(f"unknown token group(s) {sorted(unknown)}; valid groups: ['all', 'visual']")
        if isinstance(self.spectrum_layers, str) and self.spectrum_layers != "all":
            raise ValueError(f"spectrum_layers must be 'all', a collection of layer numbers or (), "
                             f"got {self.spectrum_layers!r}")
        if self.spectra_on not in ("auto", "device", "host"):
            raise ValueError(f"spectra_on must be 'auto', 'device' or 'host', got {self.spectra_on!r}")
        check_share(self.spectra_share)


class Capture:
    """Collect ``LayerStatistics`` for every prompt forward pass inside the block.

    Args:
        model: a VLM of a supported family (``lofi.families``).
        options: a ``CaptureOptions`` (default: its defaults); keyword arguments override its fields.

    Example:
        >>> with Capture(model, leverage_layers=[2]) as capture:  # doctest: +SKIP
        ...     capture.identify(question_ids)  # needed with spectra_share < 1
        ...     model(**inputs)
        ...     rows = capture.take()  # list[LayerStatistics], and the buffer is emptied
    """

    def __init__(self, model, options: CaptureOptions | None = None, **overrides):
        options = replace(options or CaptureOptions(), **{k: tuple(v) if isinstance(v, list) else v
                                                          for k, v in overrides.items()})
        self.model, self.options = model, options
        self.groups, self.center, self.top_k = tuple(options.groups), options.center, options.top_k
        self.leverage_layers, self.tau = set(options.leverage_layers), options.tau
        spectrum = options.spectrum_layers
        self.spectrum_layers = spectrum if spectrum == "all" else set(spectrum or ())
        self.family = family_for(model)
        self.layers = self.family.layers()
        self._hooks: list = []
        self._records: list = []  # LayerStatistics and _Deferred, in the order the layers ran
        self._moments: list = []  # this pass's (layer, [batch, groups, 2] moments, [batch, groups] sizes)
        self._pending: list = []  # this pass's decomposed (layer, group, statistics), still on the device
        self._geometries: dict = {}
        self._calls = 0
        self._tracker: CallTracker | None = None
        self._is_visual: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None
        self._active = False
        self._paused = False
        self._ids: list | None = None  # given by identify for the next captured pass
        self._call_ids: list | None = None
        self._subset: list[int] = []  # this pass's rows whose matrices are decomposed
        self._subset_index: torch.Tensor | None = None  # those rows on the device; None: every row
        device = next(model.parameters()).device
        self._host_spectra = options.spectra_on == "host" or (options.spectra_on == "auto" and device.type == "cuda")
        self._spectra: HostSpectra | None = None

    def identify(self, sample_ids: Sequence) -> None:
        """The ids of the next captured forward pass's samples, one per batch row, in order. They choose the
        rows that are decomposed when ``spectra_share`` < 1 (required then) and become the records'
        ``sample_id``. Used by that one pass."""
        self._ids = list(sample_ids)

    # ------------------------------------------------------------------------------- hooks
    def __enter__(self) -> "Capture":
        try:
            if self._host_spectra:
                self._spectra = HostSpectra()
            self._tracker = CallTracker.join(self.family)  # its hooks come first: the call is read when ours run
            lm = self.family.language_model()
            self._hooks.append(lm.register_forward_pre_hook(self._on_language_model, with_kwargs=True))
            for i, layer in enumerate(self.layers):
                self._hooks.append(layer.register_forward_pre_hook(self._pre_layer(i), with_kwargs=True))
            self._hooks.append(self.layers[-1].register_forward_hook(self._post_last))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        while self._hooks:
            self._hooks.pop().remove()
        if self._tracker is not None:
            self._tracker.leave()
            self._tracker = None
        self._active = False
        if self._spectra is not None:
            self._spectra.close()
            self._spectra = None

    def _on_language_model(self, module, args, kwargs):
        call = self._tracker.call
        is_visual = None if self._paused else call.is_visual
        self._is_visual = is_visual
        self._active = is_visual is not None and bool(is_visual.any())
        if not self._active:
            return
        mask = call.attention_mask
        self._valid = torch.ones_like(is_visual) if mask is None else mask.bool()
        self._moments, self._pending, self._geometries = [], [], {}  # nothing left over from an interrupted pass
        self._calls += 1
        ids, self._ids = self._ids, None
        self._choose_rows(ids, len(is_visual), is_visual.device)

    def _choose_rows(self, ids: list | None, batch: int, device: torch.device) -> None:
        """This pass's sample ids and the rows whose matrices it decomposes (the subset's, or every row)."""
        share = self.options.spectra_share
        if ids is not None and len(ids) != batch:
            raise ValueError(f"Capture.identify was given {len(ids)} sample ids for a batch of {batch}; give one "
                             "id per row, in order")
        if ids is None and share < 1:
            raise ValueError(f"spectra_share={share} decomposes a seeded subset of the samples, chosen by their "
                             "ids: call capture.identify(sample_ids) before each captured forward pass (or use "
                             "spectra_share=1)")
        self._call_ids = ids
        self._subset = list(range(batch)) if share >= 1 else subset_rows(ids, share, self.options.spectra_seed)
        self._subset_index = _device_index(self._subset, device) if 0 < len(self._subset) < batch else None

    def _pre_layer(self, layer: int):
        # layer 0's input is the input embeddings; taken here, after any pruning at layer 0
        def hook(module, args, kwargs):
            if self._active:
                self._record(layer, args[0] if args else kwargs["hidden_states"])
        return hook

    def _post_last(self, module, args, output):
        if self._active:
            hidden = output[0] if isinstance(output, tuple) else output
            self._record(len(self.layers), hidden)
            self._flush()

    # ------------------------------------------------------------------------------- statistics
    def _geometry(self, layer: int) -> _Geometry:
        """The ``_Geometry`` of the tokens ``layer`` holds: one per pruning stage and forward pass."""
        handle = self._tracker.pruning
        index = handle.sequence_index(layer) if handle is not None else None
        key = None if index is None or index.shape[1] == self._is_visual.shape[1] else id(index)
        if key not in self._geometries:
            is_visual, valid = self._is_visual, self._valid
            visual_rank = None  # original visual index of each token: only leverage records it
            if self.leverage_layers:
                visual_rank = torch.where(is_visual, is_visual.long().cumsum(1) - 1, -1)
            if key is not None:
                real, safe = index >= 0, index.clamp_min(0)  # -1: a padding slot of a ragged pruned batch
                is_visual, valid = is_visual.gather(1, safe) & real, valid.gather(1, safe) & real
                if visual_rank is not None:
                    visual_rank = torch.where(real, visual_rank.gather(1, safe), -1)
            self._geometries[key] = _Geometry(is_visual, valid, visual_rank, self.groups)
        return self._geometries[key]

    @torch.no_grad()
    def _record(self, layer: int, hidden: torch.Tensor) -> None:
        """The statistics of one layer as device tensors, kept until the forward pass ends (``_flush``)."""
        geometry = self._geometry(layer)
        hidden = hidden.detach()
        # Uncentred, with rows <= cols: one Gram matrix of all real tokens serves both groups (the visual Gram is
        # its sub-block), and its eigenvalues are the squared singular values. It is formed in float32 from the
        # model's own dtype (spectral.gram: tensor cores for bf16 on a GPU).
        gram_all = None
        if not self.center and hidden.shape[1] <= hidden.shape[2]:
            gram_all = spectral.gram(hidden * geometry.weight(hidden.dtype))
            moments = spectral.gram_moments(gram_all, geometry.masks)
        else:
            moments = spectral.group_moments(hidden, geometry.masks, self.center)
        self._moments.append((layer, moments, geometry.counts))
        if not self._subset:
            return
        for group in self.groups:
            leverage_here = group == "visual" and layer in self.leverage_layers
            if self._decomposes(layer) or leverage_here:
                self._record_spectrum(layer, group, hidden, gram_all, geometry, leverage_here)

    def _record_spectrum(self, layer, group, hidden, gram_all, geometry: _Geometry, leverage_here: bool) -> None:
        """One group's spectrum at ``layer`` (and its leverage scores at a leverage layer), for the rows of
        this pass's subset: decomposed now, or left pending for the host or for one stacked decomposition."""
        index = self._subset_index
        rows = (lambda t: t) if index is None else (lambda t: t.index_select(0, index))  # noqa: E731
        positions = present = None
        if group == "visual":
            positions, present = map(rows, geometry.positions())
        matrix = None  # float32 rows, only where the group's own matrix is needed
        if gram_all is None or leverage_here:
            matrix = self._group_matrix(rows(hidden).float(), group, rows(geometry.valid), positions, present)
        gram = None
        if gram_all is not None:
            gram = rows(gram_all)
            if group == "visual":  # the visual rows' sub-block, zero where a sample has fewer
                gram = gram.gather(1, positions[..., None].expand(-1, -1, gram.shape[-1])).gather(
                    2, positions[:, None, :].expand(-1, positions.shape[1], -1))
                gram = gram * (present[:, :, None] & present[:, None, :]).to(gram.dtype)
        if gram is not None and self._decomposes(layer) and not leverage_here and (
                self._spectra is not None or self._stacks(gram)):
            # decomposed after the pass (_flush): on the host, where only the Gram matrix travels, or on the
            # device, every layer's of one size in one batched call
            self._pending.append((layer, group, {"gram" if self._spectra is not None else "device_gram": gram}))
            return
        s = spectral.singular_values_from_gram(gram) if gram is not None else spectral.singular_values(matrix)
        statistics = spectrum_statistics(s, self.top_k)
        if leverage_here:
            statistics.update(leverage=spectral.leverage_scores(matrix, spectral.energy_rank(s, self.tau)),
                              visual_index=rows(geometry.visual_rank).gather(1, positions), present=present)
        self._pending.append((layer, group, statistics))

    @staticmethod
    def _stacks(gram: torch.Tensor) -> bool:
        """Whether the device route waits for the pass's end to decompose: only where one call then does
        the work of many (a GPU with ``LOFI_EIGH=cusolver-batched``); torch's own route decomposes a
        batch one matrix at a time anyway, so there each layer's spectra are taken at once."""
        return gram.is_cuda and current_eigh_route() == "cusolver-batched"

    def _decompose_stacked(self) -> None:
        """The pass's deferred device-route spectra, in place: the Gram matrices of every layer and group
        of one size stacked into one decomposition, one batched call instead of one per layer and group.
        They wait on the device until then (33 of 8 x 606^2 float32, 0.4 GB, at LLaVA-1.5-7B shape and
        batch 8, every layer)."""
        by_size: dict[int, list[dict]] = {}
        for _, _, values in self._pending:
            if "device_gram" in values:
                by_size.setdefault(values["device_gram"].shape[-1], []).append(values)
        for group in by_size.values():
            grams = [values.pop("device_gram") for values in group]
            spectra = spectral.singular_values_from_gram(torch.cat(grams)).split([len(g) for g in grams])
            for values, s in zip(group, spectra):
                values.update(spectrum_statistics(s, self.top_k))

    def _flush(self) -> None:
        """Every layer's IPR and PR from its moments in one stacked reduction, then everything pending to the
        host in one transfer, as ``LayerStatistics`` rows (``_Deferred`` where the host decomposes)."""
        self._decompose_stacked()
        moments, pending = self._moments, self._pending
        self._moments, self._pending, self._geometries = [], [], {}
        if not moments:
            return
        ipr = spectral.ipr_from_moments(torch.stack([m for _, m, _ in moments]))  # [layers, batch, groups]
        host = _to_host([{"ipr": ipr, "pr": spectral.pr_from_ipr(ipr),
                          "n_tokens": torch.stack([counts for _, _, counts in moments])},
                         *(values for _, _, values in pending)])
        every = {name: tensor.tolist() for name, tensor in host[0].items()}  # one conversion per tensor
        decomposed = {(layer, group): values for (layer, group, _), values in zip(pending, host[1:])}
        for i, (layer, _, _) in enumerate(moments):
            for g, group in enumerate(self.groups):
                base = _Base(self._calls, layer, group, *([row[g] for row in every[name][i]]
                                                          for name in ("ipr", "pr", "n_tokens")),
                             self._call_ids, self._subset)
                values = decomposed.get((layer, group))
                if values is not None and "gram" in values:
                    self._records.append(_Deferred(base, self._spectra.submit(values["gram"], self.top_k)))
                else:
                    self._records.extend(base.records(values))

    def _decomposes(self, layer: int) -> bool:
        return self.spectrum_layers == "all" or layer in self.spectrum_layers

    def _group_matrix(self, H, group, valid, positions, present) -> torch.Tensor:
        """[batch, rows, d] matrix of the group, zero rows where a sample has fewer.

        Zero rows add only zero singular values, so every statistic equals that of the real rows alone
        and the batch stays one tensor: ``all`` keeps every position with padding rows set to zero,
        ``visual`` the visual rows present (``positions``, real where ``present``).
        """
        if group == "visual":
            rows, mask = H.gather(1, positions[..., None].expand(-1, -1, H.shape[-1])), present
        else:
            rows, mask = H, valid
        weight = mask[..., None].to(H.dtype)
        matrix = rows * weight
        if self.center:
            mean = matrix.sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp_min(1)
            matrix = (matrix - mean) * weight
        return matrix

    @contextmanager
    def paused(self):
        """Forward passes inside this block are not captured (e.g. teacher-forced scoring passes)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def take(self, wait: bool = True) -> list[LayerStatistics]:
        """The records collected since the last ``take``, in the order the layers ran, and the buffer emptied;
        spectra still being decomposed on the host are waited for, or with ``wait=False`` left in the buffer
        with every record after them (for a later ``take``)."""
        ready = len(self._records)
        if not wait:
            ready = next((i for i, e in enumerate(self._records) if isinstance(e, _Deferred)
                          and not e.statistics.done()), ready)
        rows, self._records = self._records[:ready], self._records[ready:]
        return [row for entry in rows for row in (entry.rows() if isinstance(entry, _Deferred) else [entry])]


@dataclass
class _Base:
    """What every row of one (call, layer, group) has: IPR and PR from its moments, its size, its sample id;
    and which rows (``subset``) a decomposition covers."""

    call: int
    layer: int
    group: str
    ipr: list[float]
    pr: list[float]
    n_tokens: list[int]
    ids: list | None
    subset: list[int]

    def records(self, spectrum: dict | None) -> list[LayerStatistics]:
        """One record per row; on the rows of ``subset``, the statistics of ``spectrum`` (host tensors, one
        entry per subset row: ``spectrum_statistics``, and leverage where taken) where there is one."""
        records = [LayerStatistics(row=row, call=self.call, layer=self.layer, group=self.group, n_tokens=n,
                                   ipr=self.ipr[row], pr=self.pr[row], effective_rank=float("nan"), singular_values=[],
                                   sample_id=None if self.ids is None else self.ids[row])
                   for row, n in enumerate(self.n_tokens)]
        if spectrum is None:
            return records
        v = {name: tensor.tolist() for name, tensor in spectrum.items()}  # one conversion per tensor
        for j, row in enumerate(self.subset):
            record = records[row]
            record.ipr, record.pr, record.effective_rank = v["ipr"][j], v["pr"][j], v["effective_rank"][j]
            record.singular_values, record.has_spectrum = v["singular_values"][j], True
            if "present" in v:
                record.leverage = [x for x, p in zip(v["leverage"][j], v["present"][j]) if p]
                record.visual_index = [x for x, p in zip(v["visual_index"][j], v["present"][j]) if p]
        return records


@dataclass
class _Deferred:
    """The records of one (call, layer, group) whose spectra a ``HostSpectra`` thread is decomposing."""

    base: _Base
    statistics: object  # Future of host_spectra.gram_statistics

    def rows(self) -> list[LayerStatistics]:
        return self.base.records(self.statistics.result())

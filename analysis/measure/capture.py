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

Where the spectra are decomposed (``CaptureOptions.spectra_on``): inline on the model's device, or --
the default on a GPU -- on the host in float64, by a background thread fed at the end of each forward
pass (``analysis.measure.host_spectra``), so that decompositions do not hold up the model.

Each call is read by the model's call tracker (``lofi.calls``), which the pruning runtime shares: its
visual positions, its attention mask, and inside ``lofi.pruned(...)`` the block's ``PruningHandle``,
which says which original tokens each layer holds, so it works unchanged there. Only calls whose prompt
contains image tokens are captured (not decoding steps).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

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
        leverage: for ``visual`` at ``leverage_layers``: per visual token present, its leverage score
            (rank at ``tau``), and ``visual_index`` the original visual-token index of each entry.
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
    leverage: list[float] | None = None
    visual_index: list[int] | None = None
    sample_id: str | None = None  # filled in by the caller, who knows which sample each row was


def _to_host(records: list[dict]) -> list[dict]:
    """The tensors of ``records`` on the CPU with one device-to-host copy: flattened into one buffer per
    dtype, moved, and split back into their shapes."""
    by_dtype: dict = {}
    for r, record in enumerate(records):
        for name, value in record.items():
            by_dtype.setdefault(value.dtype, []).append((r, name, value))
    out: list[dict] = [{} for _ in records]
    for dtype, items in by_dtype.items():
        flat = torch.cat([value.reshape(-1) for _, _, value in items]).cpu()
        start = 0
        for r, name, value in items:
            out[r][name] = flat[start:start + value.numel()].view(value.shape)
            start += value.numel()
    return out


def _visual_positions(is_visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([batch, P] positions of each sample's visual tokens in order, padded with 0; [batch, P] real)."""
    counts = is_visual.sum(1)
    order = torch.sort((~is_visual).to(torch.int8), dim=1, stable=True).indices[:, :int(counts.max())]
    return order, torch.arange(order.shape[1], device=order.device) < counts[:, None]


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
    """

    groups: tuple[str, ...] = ("visual", "all")
    center: bool = False
    top_k: int = 32
    leverage_layers: tuple[int, ...] = ()
    tau: float = 0.9
    spectrum_layers: str | tuple[int, ...] = "all"
    spectra_on: str = "auto"

    def __post_init__(self):
        unknown = set(self.groups) - {"visual", "all"}
        if unknown:
            raise ValueError(f"unknown token group(s) {sorted(unknown)}; valid groups: ['all', 'visual']")
        if isinstance(self.spectrum_layers, str) and self.spectrum_layers != "all":
            raise ValueError(f"spectrum_layers must be 'all', a collection of layer numbers or (), "
                             f"got {self.spectrum_layers!r}")
        if self.spectra_on not in ("auto", "device", "host"):
            raise ValueError(f"spectra_on must be 'auto', 'device' or 'host', got {self.spectra_on!r}")


class Capture:
    """Collect ``LayerStatistics`` for every prompt forward pass inside the block.

    Args:
        model: a VLM of a supported family (``lofi.families``).
        options: a ``CaptureOptions`` (default: its defaults); keyword arguments override its fields.

    Example:
        >>> with Capture(model, leverage_layers=[2]) as capture:  # doctest: +SKIP
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
        self._rows: list[LayerStatistics] = []
        self._pending: list = []  # this forward pass's statistics, still on the device
        self._geometries: dict = {}
        self._calls = 0
        self._tracker: CallTracker | None = None
        self._is_visual: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None
        self._active = False
        self._paused = False
        device = next(model.parameters()).device
        self._host_spectra = options.spectra_on == "host" or (options.spectra_on == "auto" and device.type == "cuda")
        self._spectra: HostSpectra | None = None

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
        self._pending, self._geometries = [], {}  # nothing left over from an interrupted pass
        self._calls += 1

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
    def _geometry(self, layer: int):
        """(is_visual, valid, visual_rank, positions, present) of the tokens ``layer`` holds: computed once
        per pruning stage and forward pass (one host sync for its width), reused by its layers."""
        handle = self._tracker.pruning
        index = handle.sequence_index(layer) if handle is not None else None
        key = None if index is None or index.shape[1] == self._is_visual.shape[1] else id(index)
        if key not in self._geometries:
            is_visual, valid = self._is_visual, self._valid
            visual_rank = torch.where(is_visual, is_visual.long().cumsum(1) - 1, -1)  # original visual index
            if key is not None:
                real, safe = index >= 0, index.clamp_min(0)  # -1: a padding slot of a ragged pruned batch
                is_visual, valid = is_visual.gather(1, safe) & real, valid.gather(1, safe) & real
                visual_rank = torch.where(real, visual_rank.gather(1, safe), -1)
            self._geometries[key] = (is_visual, valid, visual_rank, *_visual_positions(is_visual))
        return self._geometries[key]

    @torch.no_grad()
    def _record(self, layer: int, hidden: torch.Tensor) -> None:
        """The statistics of one layer as device tensors, kept until the forward pass ends (``_flush``)."""
        is_visual, valid, visual_rank, positions, present = self._geometry(layer)
        hidden = hidden.detach()
        # Uncentred, with rows <= cols: one Gram matrix of all real tokens serves both groups (the
        # visual Gram is its sub-block), and its eigenvalues are the squared singular values. It is
        # formed in float32 from the model's own dtype (spectral.gram: tensor cores for bf16 on a GPU).
        shared = not self.center and hidden.shape[1] <= hidden.shape[2]
        if shared:
            gram_all = spectral.gram(hidden * valid[..., None].to(hidden.dtype))
        H = None  # float32 rows, only where a group's own matrix is needed
        for group in self.groups:
            counts = (is_visual if group == "visual" else valid).sum(1)
            leverage_here = group == "visual" and layer in self.leverage_layers
            matrix = None
            if not shared or leverage_here:
                H = hidden.float() if H is None else H
                matrix = self._group_matrix(H, group, valid, positions, present)
            gram = None
            if shared:
                gram = gram_all
                if group == "visual":  # the visual rows' sub-block, zero where a sample has fewer
                    gram = gram_all.gather(1, positions[..., None].expand(-1, -1, gram_all.shape[-1])).gather(
                        2, positions[:, None, :].expand(-1, positions.shape[1], -1))
                    gram = gram * (present[:, :, None] & present[:, None, :]).to(gram.dtype)
            if gram is not None and self._decomposes(layer) and not leverage_here and (
                    self._spectra is not None or self._stacks(gram)):
                # decomposed after the pass (_flush): on the host, where only the Gram matrix travels, or
                # on the device, every layer's of one size in one batched call
                self._pending.append((layer, group, {"n_tokens": counts,
                                                     "gram" if self._spectra is not None else "device_gram": gram}))
                continue
            extra = {}
            if self._decomposes(layer) or leverage_here:
                s = spectral.singular_values_from_gram(gram) if gram is not None else spectral.singular_values(matrix)
                statistics = spectrum_statistics(s, self.top_k)
                if leverage_here:
                    extra = {"leverage": spectral.leverage_scores(matrix, spectral.energy_rank(s, self.tau)),
                             "visual_index": visual_rank.gather(1, positions), "present": present}
            else:  # IPR and PR need no decomposition; effective rank and the spectrum do
                ipr = spectral.ipr_from_gram(gram) if gram is not None else spectral.ipr_from_matrix(matrix)
                statistics = {"ipr": ipr, "pr": torch.where(ipr > 0, 1 / ipr.clamp_min(1e-30), torch.zeros_like(ipr)),
                              "effective_rank": torch.full_like(ipr, float("nan")),
                              "singular_values": ipr.new_zeros(len(hidden), 0)}
            self._pending.append((layer, group, {**statistics, "n_tokens": counts, **extra}))

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
        """Every pending layer's statistics to the host in one transfer, as ``LayerStatistics`` rows."""
        self._decompose_stacked()
        pending, self._pending = self._pending, []
        self._geometries = {}
        if not pending:
            return
        host = _to_host([values for _, _, values in pending])
        for (layer, group, _), values in zip(pending, host):
            if "gram" in values:
                self._rows.append(_Deferred(self._calls, layer, group, values["n_tokens"].tolist(),
                                            self._spectra.submit(values["gram"], self.top_k)))
                continue
            v = {name: tensor.tolist() for name, tensor in values.items()}  # one conversion per tensor
            for row in range(len(v["ipr"])):
                present = v["present"][row] if "present" in v else None
                self._rows.append(LayerStatistics(
                    row=row, call=self._calls, layer=layer, group=group, n_tokens=v["n_tokens"][row],
                    ipr=v["ipr"][row], pr=v["pr"][row], effective_rank=v["effective_rank"][row],
                    singular_values=v["singular_values"][row],
                    leverage=None if present is None else [x for x, p in zip(v["leverage"][row], present) if p],
                    visual_index=None if present is None else [x for x, p in zip(v["visual_index"][row], present)
                                                               if p]))

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
        ready = len(self._rows)
        if not wait:
            ready = next((i for i, e in enumerate(self._rows) if isinstance(e, _Deferred)
                          and not e.statistics.done()), ready)
        rows, self._rows = self._rows[:ready], self._rows[ready:]
        return [row for entry in rows for row in (entry.rows() if isinstance(entry, _Deferred) else [entry])]


@dataclass
class _Deferred:
    """The records of one (layer, group) whose spectra a ``HostSpectra`` thread is decomposing."""

    call: int
    layer: int
    group: str
    n_tokens: list[int]
    statistics: object  # Future of host_spectra.gram_statistics

    def rows(self) -> list[LayerStatistics]:
        v = {name: tensor.tolist() for name, tensor in self.statistics.result().items()}
        return [LayerStatistics(row=row, call=self.call, layer=self.layer, group=self.group, n_tokens=n,
                                ipr=v["ipr"][row], pr=v["pr"][row], effective_rank=v["effective_rank"][row],
                                singular_values=v["singular_values"][row]) for row, n in enumerate(self.n_tokens)]

"""Batched selection kernels of the published pruning methods: which visual tokens each method keeps (and, for
VisionZip, what it merges), given the tensors the method reads from the model.

Each kernel takes a padded batch (``features`` [B, P, d] in any float dtype, ``valid`` [B, P] bool, ``n_keep``
[B] on the host) plus the method's own inputs, computes in float32 on the features' device with no per-sample
Python loop and no device read inside its greedy loop, breaks ties by the lowest token index, and returns
``kept`` [B, max(n_keep)]: each sample's kept indices in increasing order, -1 after the last.

    cdpruner_select   conditional DPP, greedy MAP            (``lofi.selectors.dpp``)
    scope_select      saliency x facility-location coverage  (``lofi.selectors.coverage``)
    divprune_select   max-min diversity                      (``lofi.selectors.diversity``)
    visionzip_select  dominant + merged contextual tokens    (``lofi.selectors.merge``)
    vispruner_select  important + de-duplicated tokens       (``lofi.selectors.duplicates``)

``lofi.selectors.flops`` counts each kernel's FLOPs from its shapes. Where the tensors come from (which tower
layer, [CLS], projector outputs, instruction embeddings) is the caller's business; each kernel's docstring names
what its reference implementation uses.
"""

from lofi.selectors.coverage import scope_select
from lofi.selectors.diversity import divprune_select
from lofi.selectors.dpp import cdpruner_select
from lofi.selectors.duplicates import vispruner_select
from lofi.selectors.merge import VisionZipSelection, visionzip_select

__all__ = ["cdpruner_select", "scope_select", "divprune_select", "visionzip_select", "vispruner_select",
           "VisionZipSelection"]

"""lofi: visual-token pruning that truly drops tokens inside Hugging Face VLMs of every family it knows.

    import lofi
    lofi.available()                      # ['fastv', 'lofi', 'random', ...]
    with lofi.pruned(model, "lofi", keep=0.25, layer=2) as handle:
        ids = model.generate(**inputs, max_new_tokens=8)
        handle.kept                       # per stage: [batch, n_kept] kept visual-token indices

Methods only choose which visual tokens to keep (``lofi.registry``); one runtime applies the choice
(``lofi.runtime``); each model family is a small adapter (``lofi.families``: LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL); ``lofi.count_flops`` gives the FLOPs of a pruning schedule
(``lofi.method_flops``: of a prompt under a method);
``lofi.compiled`` runs the layers through ``torch.compile`` (opt-in).
This package never imports ``analysis``.
"""

from lofi import methods as _methods  # noqa: F401  (registers the built-in methods)
from lofi.compiled import compiled
from lofi.flops import Flops, count_flops, method_flops
from lofi.methods.replay import Replay
from lofi.registry import Choice, PruningMethod, StageInput, available, build, describe, options, register
from lofi.runtime import PruningHandle, active, pruned

__all__ = ["pruned", "available", "describe", "options", "register", "build", "PruningMethod", "StageInput",
           "Choice", "PruningHandle", "Replay", "active", "count_flops", "method_flops", "Flops", "compiled"]

"""What each call of a VLM brings, read once for everything that follows the model.

A ``CallTracker`` owns the pre-hooks of a model's multimodal model (the module that receives
``input_ids`` and the images) and of its language model. The first reads the call's arguments by name
(``Family.call_arguments``): its ids, its 2-D attention mask, whether it brings images or videos
(``Family.brings_visual``). The second adds the cached prefix's length and publishes the call as a
``Call``, whose visual positions are worked out when first asked (``Family.call_visual_mask``: after a
cached prefix, only in a call that brings an image) and then shared by every reader.

One tracker serves every user of a model at once (the pruning runtime, ``analysis`` capture): ``join``
finds the tracker among the multimodal model's hooks or attaches a new one, and the last ``leave``
removes its hooks. The pruning runtime takes part in the hooks themselves (``prune_with``): it sees
each call first and may change the language model's arguments, and its handle is where observers read
which original tokens each layer holds (``pruning``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

import torch

from lofi.families import Family

if TYPE_CHECKING:
    from lofi.runtime import PruningHandle


@dataclass
class Call:
    """One call of the multimodal model, as its language model receives it.

    Attributes:
        input_ids: [batch, T] the call's ids; None where it passed ``inputs_embeds``.
        attention_mask: the mask the multimodal model was given (2-D: 1 at real tokens), or None.
        brings_visual: whether the call carries images or videos.
        past: tokens already in the KV cache (0: the call starts a sequence); set by the language model's call.
    """

    family: Family = field(repr=False)
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    brings_visual: bool = False
    past: int = 0

    @cached_property
    def is_visual(self) -> torch.Tensor | None:
        """[batch, T] bool: the visual positions of the call's ids, or None where there is nothing to read
        (no ids, or a call after a cached prefix that brings no image: ``Family.call_visual_mask``)."""
        return self.family.call_visual_mask(self.input_ids, self.brings_visual, self.past)


class Pruner(Protocol):
    """What the pruning runtime gives a tracker: it sees each call before any other reader."""

    handle: "PruningHandle"

    def on_multimodal(self, call: Call) -> None: ...

    def on_language_model(self, call: Call, args: tuple, kwargs: dict) -> tuple | None: ...


class CallTracker:
    """Reads the calls of one model for all of its users (see the module docstring).

    Attributes:
        family: the model's family adapter.
        call: the language model's latest call.
        pruner: the ``lofi.pruned`` block's runtime, while one is active.
    """

    def __init__(self, family: Family):
        self.family = family
        self.call: Call | None = None
        self.pruner: Pruner | None = None
        self._pending: Call | None = None  # read by the multimodal model's pre-hook, for its language model's call
        self._hooks: list = []
        self._users = 0

    # ------------------------------------------------------------------ users
    @classmethod
    def attached(cls, family: Family) -> CallTracker | None:
        """The tracker following ``family``'s model, found among its multimodal model's pre-hooks, or None."""
        for hook in family.multimodal_model()._forward_pre_hooks.values():
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, cls):
                return owner
        return None

    @classmethod
    def join(cls, family: Family) -> CallTracker:
        """The tracker of ``family``'s model, attached on first use; every ``join`` is matched by one ``leave``."""
        tracker = cls.attached(family) or cls(family)
        if not tracker._users:
            tracker._attach()
        tracker._users += 1
        return tracker

    def leave(self) -> None:
        self._users -= 1
        if not self._users:
            while self._hooks:
                self._hooks.pop().remove()
            self.call = self._pending = None

    def _attach(self) -> None:
        # prepended: whatever else observes these modules reads the call, and sees the pruned inputs
        try:
            for module, hook in ((self.family.multimodal_model(), self._on_multimodal),
                                 (self.family.language_model(), self._on_language_model)):
                self._hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))
        except BaseException:
            while self._hooks:
                self._hooks.pop().remove()
            raise

    @property
    def pruning(self) -> PruningHandle | None:
        """The handle of the ``lofi.pruned`` block the model is in, or None."""
        return None if self.pruner is None else self.pruner.handle

    def prune_with(self, pruner: Pruner | None) -> None:
        """Let ``pruner`` see every call first (None: no longer); a model has one at a time."""
        if pruner is not None and self.pruner is not None:
            raise RuntimeError("the model's calls already go through a pruning runtime")
        self.pruner = pruner

    # ------------------------------------------------------------------ hooks
    def _on_multimodal(self, module, args, kwargs):
        arguments = self.family.call_arguments(args, kwargs)
        self._pending = Call(self.family, arguments.get("input_ids"), arguments.get("attention_mask"),
                             self.family.brings_visual(arguments))
        if self.pruner is not None:
            self.pruner.on_multimodal(self._pending)

    def _on_language_model(self, module, args, kwargs):
        # a multimodal call is read by its own language model call only: another one (made directly) reads nothing
        call, self._pending = self._pending or Call(self.family), None
        cache = kwargs.get("past_key_values")
        call.past = cache.get_seq_length() if cache is not None else 0
        self.call = call
        if self.pruner is not None:
            return self.pruner.on_language_model(call, args, kwargs)
        return None

"""Independent per-sample references for the visual-token selection methods, in numpy float64.

Each module transcribes one method from its paper and its authors' reference repository (named, with the
commit followed, in the module docstring), one sample at a time and without padding, for clarity rather than
speed. They serve as oracles for the batched kernels of ``lofi.selectors``: same function names with a
``_reference`` suffix, same argument names, no batch dimension and no ``valid`` mask. Every function returns
the kept token indices sorted increasingly (VisionZip also returns its merged contextual tokens).

Ties are broken by the lowest token index (numpy's ``argmax`` and stable sorts).

Tests import the package as ``references`` (pytest puts tests/ on sys.path, as for ``_tiny``); under
``python -m pytest`` from the repository root ``tests.references`` works too.
"""

from .cdpruner import cdpruner_reference
from .divprune import divprune_reference
from .scope import scope_reference
from .visionzip import VisionZipReference, visionzip_reference
from .vispruner import vispruner_reference

__all__ = ["cdpruner_reference", "divprune_reference", "scope_reference", "visionzip_reference",
           "VisionZipReference", "vispruner_reference"]

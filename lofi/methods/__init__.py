"""The built-in methods; importing this package registers them."""

from lofi.methods import cdpruner, divprune, fastv, leverage, lvpruning, random, scope, visionzip, vispruner  # noqa: F401

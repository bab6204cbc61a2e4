"""The built-in methods; importing this package registers them."""

from lofi.methods import fastv, leverage, lvpruning, random  # noqa: F401

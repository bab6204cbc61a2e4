"""Training what a method learns: LVPruning's decision modules (``lofi.training.lvpruning``)."""

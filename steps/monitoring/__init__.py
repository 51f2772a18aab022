"""Watching what the model is given after it ships: the reference profile train stores inside the model
(``profile``), the per-batch drift check infer runs against it (``drift``), and gathering a batch's
features while it is scored (``collect``)."""

"""The registered model: its own self-contained code (``serving``), logging it (``packaging``), the check
of a registered version's files (``provenance``), and the REST front that serves ``prod`` (``front``)."""

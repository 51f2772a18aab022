"""Everything that reads or writes MLflow: the tracking store, stage runs and what they log, stage
fingerprints for reuse, the registry and its ``prod`` rule, and a store kept between CI runs."""

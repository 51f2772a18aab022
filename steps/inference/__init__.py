"""What ``infer`` writes and how it scales out: the predictions file (``outputs``) and the Spark engine
(``spark``)."""

"""The worker service: keeps its data, trains each model version it is given, sends the delta."""

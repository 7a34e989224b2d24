"""The aggregator service: owns the global model, its version, the partition table and the
checkpoint; folds worker updates into weighted FedAvg and publishes each new version."""

"""fedmq: federated learning as a message-queue service.

This package holds what the aggregator and the worker share: settings, messages, the tensor
codec, chunking, the broker interface with its RabbitMQ and in-memory implementations, and the
learning task (data sets, partitions, models). It imports neither service.
"""

__version__ = "0.1.0"

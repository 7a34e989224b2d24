"""Broker interface and its implementations; see :mod:`fedmq.broker.base`."""

from fedmq.broker.base import Broker, Delivery, DeliveryHandler
from fedmq.broker.memory import MemoryBroker, MemoryHub

__all__ = ["Broker", "Delivery", "DeliveryHandler", "MemoryBroker", "MemoryHub"]

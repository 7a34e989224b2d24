"""The ``fedmq`` command: builds the settings once and starts a service, or the embedded mode.

It lives outside the ``fedmq`` package so that ``fedmq`` imports neither service.
"""

"""Celery workers: thin adapters between Django records and the carry-on core.

Queues: ``default`` (validation, bookkeeping), ``embed`` (feature extraction on inference
nodes that hold the base), ``train`` (carry-on training on training nodes).
"""

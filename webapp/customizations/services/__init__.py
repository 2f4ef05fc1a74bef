"""Writes and state transitions of the customization records, split by subdomain.

``base_models`` registration and the per-process tokenizer; ``files`` upload and validation;
``jobs`` creation, cancel, retry and the status machine; ``pipeline`` what the Celery tasks
record (claims, heartbeats, progress, events, checkpoints, feature sets, results);
``adapters`` activation and deletion; ``artifacts`` paths and garbage collection.
"""

"""Writes and state transitions of the customization records, split by subdomain.

``base_models`` registration; ``files`` upload and validation (and the tokenization kept);
``jobs`` creation, cancel, retry and the status machine; what the Celery tasks record in
``claims`` (claims, heartbeats, sweeps), ``planning`` (splits, configs, tokens, feature sets)
and ``results`` (progress, metrics, checkpoints, the adapter, failure); ``adapters``
activation and deletion; ``artifacts`` garbage collection (the layout itself:
``webapp.customizations.artifacts``).
"""

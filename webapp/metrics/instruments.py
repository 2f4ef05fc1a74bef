"""Every Prometheus figure the processes record as they work (the scrape-time ones, read
from the database and the broker, are in collectors.py).

Web processes and Celery workers import these. With ``PROMETHEUS_MULTIPROC_DIR`` set
(``runstudio`` sets it; see README "Metrics") each process writes its values to files in
that folder and ``/metrics`` adds them up, as prometheus_client documents for multi-process
servers; without it the values live in this process's default registry. The variable must
be set before prometheus_client is first imported: settings or the process manager do it.

Labels stay bounded: ``model`` is the *base* model name (per-adapter figures are in the
usage records), ``outcome`` one of OUTCOMES, ``stage`` and ``queue`` fixed sets.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# How a chat completion ended: every choice stopped (a stop token or string), at least one
# ran out of tokens, the engine failed, the client went away first; or it was refused
# before decoding (4xx: engine busy, prompt too long, ...).
OUTCOMES = ("stop", "length", "error", "disconnected", "refused")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
STAGE_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)

# -- chat completions (web processes) ------------------------------------------------------
chat_requests = Counter(
    "carry_on_chat_requests", "Chat completions by base model and outcome.", ["model", "outcome"]
)
chat_duration = Histogram(
    "carry_on_chat_request_duration_seconds",
    "From a chat's arrival to its last token (or refusal).",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
chat_ttft = Histogram(
    "carry_on_chat_time_to_first_token_seconds",
    "From a chat's arrival to its first generated token.",
    ["model"],
    buckets=TTFT_BUCKETS,
)
prompt_tokens = Counter("carry_on_chat_prompt_tokens", "Prompt tokens of chats.", ["model"])
generated_tokens = Counter(
    "carry_on_chat_generated_tokens", "Tokens generated for chats (all choices).", ["model"]
)
chats_in_flight = Gauge(
    "carry_on_chat_in_flight",
    "Chat completions admitted and not yet finished.",
    ["model"],
    multiprocess_mode="livesum",
)

# -- the serving engine, sampled (web processes) --------------------------------------------
engine_batch_size = Gauge(
    "carry_on_engine_batch_size",
    "Sequences in the running decode batch.",
    ["model"],
    multiprocess_mode="livesum",
)
engine_queue_depth = Gauge(
    "carry_on_engine_queue_depth",
    "Sequences waiting to join the decode batch.",
    ["model"],
    multiprocess_mode="livesum",
)
engine_kv_cache_bytes = Gauge(
    "carry_on_engine_kv_cache_bytes",
    "Bytes the decode batch's KV caches hold (the base's and the carry-ons', room to grow "
    "included).",
    ["model"],
    multiprocess_mode="livesum",
)
engine_decode_steps = Counter(
    "carry_on_engine_decode_steps", "Batched decode steps (one base forward each).", ["model"]
)
engine_decode_rows = Counter(
    "carry_on_engine_decode_rows",
    "Sequence-steps served by the decode steps (rows / steps = mean batch size).",
    ["model"],
)
adapter_cache_loads = Counter(
    "carry_on_adapter_cache_loads", "Adapters loaded from their artifact into the cache."
)
adapter_cache_hits = Counter("carry_on_adapter_cache_hits", "Adapter lookups served from cache.")
adapter_cache_entries = Gauge(
    "carry_on_adapter_cache_entries", "Adapters in the cache.", multiprocess_mode="livesum"
)
adapter_cache_bytes = Gauge(
    "carry_on_adapter_cache_bytes",
    "Parameter bytes of the cached adapters.",
    multiprocess_mode="livesum",
)

# -- usage records (web processes) -----------------------------------------------------------
usage_written = Counter("carry_on_usage_records_written", "Usage records written.")
usage_dropped = Counter(
    "carry_on_usage_records_dropped",
    "Usage records given up on (their user was deleted, or the buffer overflowed while the "
    "database was unreachable).",
)
usage_buffered = Gauge(
    "carry_on_usage_records_buffered",
    "Usage records waiting to be written.",
    multiprocess_mode="livesum",
)

# -- fine-tuning stages (Celery workers) -----------------------------------------------------
job_stage_duration = Histogram(
    "carry_on_job_stage_duration_seconds",
    "Wall time of a job stage run by a worker, by stage and result (done, failed, stopped, retry).",
    ["stage", "result"],
    buckets=STAGE_BUCKETS,
)

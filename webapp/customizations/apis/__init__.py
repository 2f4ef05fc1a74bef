"""The OpenAI-compatible REST API for files, fine-tuning jobs and models, one module each.

Paths, object shapes and field names follow OpenAI's API so the official ``openai`` client
works unchanged; adapter options ride along as documented extension fields (``preset``,
``carry_on`` or ``tail`` on a job; ``kind``, ``depth`` and ``preset`` on a fine-tuned
model). Each view parses input, calls one service or selector, and serializes.
"""

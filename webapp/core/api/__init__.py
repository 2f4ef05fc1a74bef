"""What every /v1 endpoint shares, one module per concern.

The API answers exactly like OpenAI's, so the official ``openai`` client works against it
unchanged: ``errors`` renders every failure as ``{"error": {"message", "type", "param",
"code"}}`` with the status OpenAI uses; ``parsing`` refuses bodies that could not be stored;
``views`` holds the base view (auth, rate limits with ``x-ratelimit-*`` headers); and
``pagination`` OpenAI's list envelope ``{"object": "list", "data", "has_more", "first_id",
"last_id"}`` with its cursor. ``objects`` has the small pieces every object shape shares.
"""

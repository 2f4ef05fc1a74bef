"""The Django side of Carry-On Studio: records, HTTP, HTML and the admin.

Apps: ``core`` (errors, shared base model), ``accounts`` (users, API keys),
``customizations`` (datasets, jobs, adapters), ``serving`` (chat completions).
"""

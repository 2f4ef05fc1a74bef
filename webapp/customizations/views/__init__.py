"""Browser pages: datasets, jobs, adapters and the playground.

Each view parses input, calls one service or selector and renders; no business rules.
Every page works without JavaScript; static/studio/studio.js adds drag and drop with an
upload progress bar, live job updates, the time estimate and streamed chat on top.
"""

from webapp.customizations.views.adapters import (
    adapter_active_view,
    adapter_delete_view,
    adapter_download,
    adapter_list,
    adapter_rename_view,
)
from webapp.customizations.views.files import (
    dashboard,
    file_detail,
    file_example_create,
    file_list,
)
from webapp.customizations.views.jobs import (
    job_cancel_view,
    job_create_view,
    job_detail,
    job_estimate,
    job_list,
    job_live,
    job_new,
    job_retry_view,
)
from webapp.customizations.views.playground import playground

__all__ = [
    "adapter_active_view",
    "adapter_delete_view",
    "adapter_download",
    "adapter_list",
    "adapter_rename_view",
    "dashboard",
    "file_detail",
    "file_example_create",
    "file_list",
    "job_cancel_view",
    "job_create_view",
    "job_detail",
    "job_estimate",
    "job_list",
    "job_live",
    "job_new",
    "job_retry_view",
    "playground",
]

"""Example datasets ("try one"): a generated demo task stored as the user's own upload.

The JSONL comes from ``customization.demo_tasks`` (generated, nothing downloaded) and goes
through ``file_create`` like any upload, so it is validated, counted and stored the same
way. Its name, ``example-<task>.jsonl``, is how the playground later recognises an adapter
trained on it and suggests held-out problems to try.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile

from webapp.accounts.models import User
from webapp.core.exceptions import ApplicationError
from webapp.customizations.models import Adapter, File
from webapp.customizations.services.files import file_create

_FILENAME = re.compile(r"^example-(?P<task>[a-z]+)\.jsonl$")
N_SUGGESTIONS = 3


@dataclass(frozen=True)
class ExampleDataset:
    name: str
    title: str
    summary: str
    n_examples: int


def _rows(task_rows: int) -> int:
    # Tests shrink the datasets (a job on 400 examples takes minutes on a CPU).
    return int(getattr(settings, "CARRY_ON_EXAMPLE_ROWS", 0) or task_rows)


def example_dataset_list() -> list[ExampleDataset]:
    """The example datasets on offer, the demo's default first."""
    from customization.demo_tasks import DEFAULT_TASK, TASKS

    ordered = sorted(TASKS.values(), key=lambda task: task.name != DEFAULT_TASK)
    return [ExampleDataset(t.name, t.title, t.summary, _rows(t.n_train)) for t in ordered]


def example_file_create(*, user: User, name: str) -> File:
    """Generate the example dataset ``name`` and store it as the user's upload."""
    from customization.demo_tasks import TASKS

    task = TASKS.get(name)
    if task is None:
        raise ApplicationError(
            f"unknown example dataset {name!r}; choose one of {', '.join(TASKS)}",
            param="example",
            code="unknown_example",
        )
    data = task.jsonl(_rows(task.n_train), seed=0)
    upload = SimpleUploadedFile(f"example-{task.name}.jsonl", data, "application/jsonl")
    return file_create(user=user, upload=upload)


def example_prompts(*, adapter: Adapter | None) -> list[str]:
    """Held-out problems to try on an adapter trained on an example dataset, else none."""
    from customization.demo_tasks import TASKS

    if adapter is None or adapter.job is None or adapter.job.training_file is None:
        return []
    match = _FILENAME.match(adapter.job.training_file.filename)
    task = TASKS.get(match["task"]) if match else None
    return task.held_out_prompts(N_SUGGESTIONS) if task else []

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from customization.demo_tasks import DEFAULT_TASK, TASKS, get_task
from tests.factories import PASSWORD, AdapterFactory, FileFactory, UserFactory
from webapp.core.exceptions import ApplicationError
from webapp.core.utils import data_path
from webapp.customizations.models import File
from webapp.customizations.services.examples import (
    example_dataset_list,
    example_file_create,
    example_prompts,
)

pytestmark = pytest.mark.django_db


def test_every_demo_task_is_offered_the_default_first() -> None:
    """The list names every task once, the demo's default (dates) first."""
    names = [example.name for example in example_dataset_list()]
    assert names[0] == DEFAULT_TASK == "dates"
    assert sorted(names) == sorted(TASKS)


def test_an_example_dataset_is_stored_and_validated_like_an_upload(
    tiny_base_model: Any, settings: Any
) -> None:
    """The generated JSONL becomes the user's processed File, with its report and tokens."""
    settings.CARRY_ON_EXAMPLE_ROWS = 20
    user = UserFactory()
    file = example_file_create(user=user, name="dates")
    assert (file.owner, file.filename, file.status) == (user, "example-dates.jsonl", "processed")
    assert (file.n_examples, file.format) == (20, "chat")
    assert file.report["ok"]
    assert file.n_tokens > 0
    assert data_path(file.path).read_bytes() == get_task("dates").jsonl(20, seed=0)


def test_an_unknown_example_is_refused_naming_the_choices() -> None:
    """An unknown name is an ApplicationError listing the datasets; nothing is stored."""
    with pytest.raises(ApplicationError, match="booking"):
        example_file_create(user=UserFactory(), name="nope")
    assert not File.objects.exists()


def test_try_one_posts_then_shows_the_report(tiny_base_model: Any, settings: Any) -> None:
    """POST /files/examples/ stores the dataset and redirects to its report page."""
    settings.CARRY_ON_EXAMPLE_ROWS = 12
    user = UserFactory()
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    response = client.post("/files/examples/", {"example": "routing"})
    assert response.status_code == 302, response.content
    file = File.objects.get(owner=user)
    assert response.status_code == 302
    assert response["Location"] == f"/files/{file.id}/"
    assert client.post("/files/examples/", {"example": "nope"}).status_code == 400
    assert "Try: Support ticket routing" in client.get("/").content.decode()


def test_held_out_problems_are_suggested_only_for_example_trained_adapters(
    tiny_base_model: Any,
) -> None:
    """An adapter trained on example-routing.jsonl gets routing's held-out prompts; others none."""
    example = AdapterFactory(job__training_file=FileFactory(filename="example-routing.jsonl"))
    other = AdapterFactory(job__training_file=FileFactory(filename="mine.jsonl"))
    assert example_prompts(adapter=example) == get_task("routing").held_out_prompts(3)
    assert example_prompts(adapter=other) == []
    assert example_prompts(adapter=None) == []

"""A first run without a file: try an example dataset, train on it, chat with a held-out problem.

Headless Chromium against the live server, with a real Celery worker and the real bundled
base. The example dataset is shrunk to a few dozen rows (CARRY_ON_EXAMPLE_ROWS) so the job
is short; the demo's figures come from `make demo`, not from here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from customization.demo_tasks import get_task
from tests.e2e.conftest import Tab
from tests.factories import PASSWORD, UserFactory
from tests.helpers.celery_workers import Workers
from webapp.customizations.models import Adapter, File, FineTuningJob

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True),
]


def _wait_for_job(tab: Tab, job: FineTuningJob, timeout_ms: int = 900_000) -> None:
    """The job page reloads itself when the job ends; wait for its link to the playground."""
    tab.page.get_by_text("Chat with it in the playground").wait_for(timeout=timeout_ms)
    job.refresh_from_db()
    assert job.status == FineTuningJob.Status.SUCCEEDED, tab.page.inner_text("main")


def test_example_datasets_are_offered_on_the_dashboard_and_the_upload_page(
    tab: Tab, tiny_base_model: Any
) -> None:
    """Both pages list every example dataset with a "Try" button, the default first."""
    user = UserFactory()
    tab.sign_in(user.username, PASSWORD)
    for path in ("/", "/files/"):
        tab.go(path)
        buttons = tab.page.get_by_role("button", name=re.compile(r"^Try: ")).all_inner_texts()
        assert buttons[0] == "Try: Dates to ISO 8601", buttons
        assert "Try: Booking requests to JSON" in buttons
        assert "Try: Arithmetic word problems" in buttons
        tab.assert_labelled()
    tab.shot("examples-01-dashboard")


@pytest.mark.slow
def test_start_a_job_from_an_example_dataset_and_chat_with_the_result(
    tab: Tab, smollm2: Any, workers: Callable[..., Workers], settings: Any
) -> None:
    """Try one (no file), read its report, train, then send a suggested held-out problem."""
    settings.CARRY_ON_EXAMPLE_ROWS = 24
    workers(CARRY_ON_TORCH_THREADS="1").start("all", "default,embed,train")
    user = UserFactory()
    page = tab.page
    tab.sign_in(user.username, PASSWORD)

    # Try the booking dataset: it is generated, validated and stored as the user's upload.
    page.get_by_role("button", name="Try: Booking requests to JSON").click()
    page.wait_for_url(re.compile(r"/files/file-[A-Za-z0-9]+/$"))
    assert "No problems found" in page.inner_text("main")
    assert re.search(r"Valid examples\s+24", page.locator("table.facts").inner_text())
    file = File.objects.get(owner=user)
    assert (file.filename, file.status) == ("example-booking.jsonl", File.Status.PROCESSED)
    tab.shot("examples-02-report")

    # Start a job with the page's defaults, one epoch, and wait for it.
    page.get_by_role("link", name="Start job with this dataset").click()
    page.get_by_label("Epochs").fill("1")
    page.get_by_role("button", name="Start job").click()
    page.wait_for_url(re.compile(r"/jobs/ftjob-[A-Za-z0-9]+/$"))
    job = FineTuningJob.objects.get(owner=user)
    assert job.training_file_id == file.id
    _wait_for_job(tab, job)
    adapter = Adapter.objects.get(job=job)

    # The playground's empty state suggests held-out problems; one click fills the message.
    page.get_by_role("link", name="Chat with it in the playground").click()
    page.wait_for_url(re.compile(r"/playground/"))
    assert page.get_by_label("Chat with").input_value() == adapter.name
    suggested = get_task("booking").held_out_prompts(3)
    links = page.locator("[data-suggestion]")
    assert links.all_inner_texts() == suggested
    tab.shot("examples-03-playground-suggestions")
    links.first.click()
    page.wait_for_url(re.compile(r"prompt="))
    message = page.get_by_label("Message", exact=True)
    assert message.input_value() == suggested[0]

    # Send it: the adapter's answer streams in.
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("48")
    message.press("Enter")
    answer = tab.finished_answer()
    assert not answer.evaluate("el => el.parentNode.classList.contains('error')")
    assert answer.inner_text().strip()
    tab.assert_labelled()
    tab.shot("examples-04-playground-answer")

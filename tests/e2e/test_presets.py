"""A preset in a real browser: pick "Balanced" in the job form, train the tail, chat with it.

Headless Chromium against the live server, with a real Celery worker and the real bundled
base (see conftest.py). Screenshots go to test-artifacts/screenshots/presets-*.png.
"""

from __future__ import annotations

import json
import re
import time
import zipfile
from collections.abc import Callable
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from playwright.sync_api import Error as PlaywrightError

from customization.presets import PRESETS
from tests.e2e.conftest import Tab
from tests.factories import PASSWORD, FileFactory, UserFactory
from tests.helpers.celery_workers import Workers
from webapp.customizations.models import Adapter, FineTuningJob
from webapp.customizations.services.files import file_create

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True),
]


def _demo_upload(n: int) -> SimpleUploadedFile:
    from customization.demo_data import generate_demo_problems

    text = "".join(json.dumps(row) + "\n" for row in generate_demo_problems(n, seed=0))
    return SimpleUploadedFile("demo.jsonl", text.encode())


def _wait_until_finished(tab: Tab, timeout: float = 1800) -> str:
    """The job page's status once terminal (the page reloads itself when the job ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = tab.page.evaluate("() => document.getElementById('job').dataset.status")
        except PlaywrightError:
            tab.page.wait_for_load_state()
            continue
        if status in ("succeeded", "failed", "cancelled"):
            return str(status)
        time.sleep(1)
    raise AssertionError(f"the job did not finish:\n{tab.page.inner_text('main')}")


@pytest.mark.slow
def test_a_preset_picked_in_the_form_trains_a_tail_to_chat_with(
    tab: Tab, smollm2: Any, workers: Callable[..., Workers]
) -> None:
    """Balanced shows the tail's fields and estimate, trains a depth-16 tail that chats and
    downloads as its PEFT folder."""
    pool = workers(CARRY_ON_TORCH_THREADS="2")
    pool.start("all", "default,embed,train")
    user = UserFactory(username="grace")
    file = file_create(user=user, upload=_demo_upload(12))
    page = tab.page
    tab.sign_in(user.username, PASSWORD)

    # The form: Fast is the default; Balanced shows the tail's size and hides the carry-on's.
    tab.go(f"/jobs/new/?training_file={file.id}")
    assert page.get_by_label("Fast").is_checked()
    assert page.get_by_label("Carry-on width").is_visible()
    assert not page.get_by_label("Tail depth").is_visible()
    fast = page.locator("#estimate").inner_text()
    page.get_by_label("Balanced").check()
    page.get_by_label("Tail depth").wait_for(state="visible")
    assert not page.get_by_label("Carry-on width").is_visible()
    page.wait_for_function(
        "previous => /about/.test(document.getElementById('estimate').textContent)"
        " && document.getElementById('estimate').textContent !== previous",
        arg=fast,
    )
    for name in ("fast", "balanced", "best"):
        assert page.locator(f"#estimate-{name}").inner_text().startswith("about")
    page.get_by_label("Epochs").fill("1")
    page.get_by_label("Batch size").fill("4")
    page.get_by_label("Seed").fill("0")
    page.get_by_label("Name suffix").fill("tail-e2e")
    tab.assert_labelled()
    tab.shot("presets-01-new-job-balanced")
    page.get_by_role("button", name="Start job").click()
    page.wait_for_url(re.compile(r"/jobs/ftjob-[A-Za-z0-9]+/$"))
    assert "tail · preset balanced" in " ".join(page.inner_text("main").split())

    # Train, then the job page and the adapter name the tail.
    status = _wait_until_finished(tab)
    assert status == "succeeded", f"{page.inner_text('main')}\n{pool.tail()}"
    job = FineTuningJob.objects.get()
    adapter = Adapter.objects.get(job=job)
    depth = PRESETS["balanced"].tail_depth(smollm2.fingerprint["num_layers"])
    assert (job.kind, job.preset, job.tail["depth"]) == ("tail", "balanced", depth)
    assert (adapter.kind, adapter.depth, adapter.preset) == ("tail", depth, "balanced")
    tab.shot("presets-02-job-succeeded")

    # Chat with it in the playground: the answer streams in.
    tab.open_playground(adapter.name, max_tokens=32)
    page.get_by_label("Message", exact=True).fill("Sam has 4 bags of 6 apples. How many apples?")
    page.get_by_label("Message", exact=True).press("Enter")
    answer = tab.finished_answer(timeout_ms=300_000)
    assert not answer.evaluate("el => el.parentNode.classList.contains('error')")
    assert answer.inner_text().strip()
    tab.shot("presets-03-playground-tail")

    # The adapter list names its kind, depth and preset.
    tab.go("/adapters/")
    row = " ".join(page.locator("tbody tr").first.inner_text().split())
    assert f"tail depth {depth} preset balanced" in row, row
    tab.shot("presets-04-adapters")
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download").click()
    with zipfile.ZipFile(download_info.value.path()) as bundle:
        names = set(bundle.namelist())
    assert {"adapter_config.json", "adapter_model.safetensors", "carry_on_tail.json"} <= names


def test_the_job_form_shows_only_the_chosen_kinds_fields(tab: Tab, tiny_base_model: Any) -> None:
    """Each preset shows its kind's size fields; Custom adds the kind; estimates follow."""
    user = UserFactory()
    file = FileFactory(owner=user)
    page = tab.page
    tab.sign_in(user.username, PASSWORD)
    tab.go(f"/jobs/new/?training_file={file.id}")
    kind = page.get_by_label("Adapter kind")
    assert not kind.is_visible()
    page.get_by_label("Best").check()
    page.get_by_label("Tail LoRA rank").wait_for(state="visible")
    assert not page.get_by_label("Carry-on blocks").is_visible()
    page.get_by_label("Custom").check()
    kind.wait_for(state="visible")
    assert page.get_by_label("Carry-on blocks").is_visible()  # Custom starts as a carry-on
    kind.select_option("tail")
    page.get_by_label("Tail depth").wait_for(state="visible")
    assert not page.get_by_label("Carry-on blocks").is_visible()
    page.get_by_label("Tail depth").fill("1")
    page.wait_for_function("() => /about/.test(document.getElementById('estimate').textContent)")
    tab.assert_labelled()
    tab.shot("presets-05-custom-tail")

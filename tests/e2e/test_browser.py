"""The whole job in a real browser: sign in, upload, read the report, train, watch, chat.

Headless Chromium against the live server, with a real Celery worker and the real bundled
base (SmolLM2-135M-Instruct) for the main flow. Screenshots of every page are written to
test-artifacts/screenshots/ (see conftest.py).
"""

from __future__ import annotations

import json
import re
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import transaction

from tests.e2e.conftest import PHONE, TIMEOUT_MS, Tab
from tests.factories import PASSWORD, UserFactory
from tests.helpers.celery_workers import Workers
from webapp.customizations.models import Adapter, FineTuningJob

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True),
]

MALFORMED = b'{"question": "What is 2+2?", "answer": "4"}\n{"question": "What is 3+3?"}\n{broken\n'
JOB_STATE = """() => {
  const svg = document.querySelector('svg.loss-curve');
  return {
    status: document.getElementById('job').dataset.status,
    stage: document.querySelector('[data-field="stage"]').textContent.trim(),
    progress: Number(document.getElementById('job-progress').value),
    points: svg ? JSON.parse(svg.dataset.points) : [],
  };
}"""


def _demo_jsonl(n: int) -> str:
    from customization.demo_data import generate_demo_problems

    return "".join(json.dumps(row) + "\n" for row in generate_demo_problems(n, seed=0))


def _drop_file(tab: Tab, name: str, text: str) -> None:
    """Drag and drop, as a person does: a File in a DataTransfer, dropped on the zone."""
    transfer = tab.page.evaluate_handle(
        """([name, text]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([text], name, {type: 'application/jsonl'}));
            return transfer;
        }""",
        [name, text],
    )
    tab.page.dispatch_event("#dropzone", "dragenter", {"dataTransfer": transfer})
    tab.page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})


@contextmanager
def _held(job: FineTuningJob) -> Iterator[None]:
    """Hold the job's row lock: the worker blocks at its next write (a step's metrics, a
    heartbeat), so the job cannot move on while the page is checked. Readers, the page's
    server among them, are not blocked."""
    with transaction.atomic():
        FineTuningJob.objects.select_for_update().get(pk=job.pk)
        yield


def _trained_steps(job: FineTuningJob) -> int:
    return job.events.filter(type="metrics", data__has_key="train_loss").count()


def _page_shows(tab: Tab, job: FineTuningJob) -> dict[str, Any]:
    """Wait until the live page (no reload) shows the job's curve and progress as stored."""
    job.refresh_from_db()
    steps, percent = _trained_steps(job), int(job.progress * 100)
    tab.page.wait_for_function(
        f"""() => {{ const s = ({JOB_STATE})();
            return s.points.length >= {steps} && s.progress === {percent}; }}""",
        timeout=TIMEOUT_MS,
    )
    return dict(tab.page.evaluate(JOB_STATE))


def _watch_training(tab: Tab, timeout: float = 900) -> dict[str, list[Any]]:
    """Watch the job page while training, with the job held still at chosen moments (no
    race with its speed): it shows what is stored, a reload shows the same, and later, with
    more steps trained, the curve has grown without a reload. Then wait for the end."""
    deadline = time.monotonic() + timeout
    job = FineTuningJob.objects.get()
    while not (job.stage == "training" and _trained_steps(job) >= 1):
        assert not job.is_terminal, f"{job.status} before training was watched: {job.error}"
        assert time.monotonic() < deadline, f"{job.status}/{job.stage}"
        time.sleep(0.05)
        job.refresh_from_db()
    with _held(job):
        first = _page_shows(tab, job)
        tab.shot("06-job-training")
        tab.page.reload()
        after_reload = dict(tab.page.evaluate(JOB_STATE))
        tab.shot("07-job-after-reload")
    steps = _trained_steps(job)
    while True:  # each round lets the writes the worker has queued through, then holds
        with _held(job):
            job.refresh_from_db()
            assert job.status == "running", f"{job.status} before the curve grew: {job.error}"
            if _trained_steps(job) > steps:
                later = _page_shows(tab, job)
                break
        assert time.monotonic() < deadline, "training made no progress"
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"the job did not finish in {timeout} s"
        time.sleep(0.5)
        job.refresh_from_db()
    assert job.status == "succeeded", job.error
    return {
        "progress": [first["progress"], later["progress"]],
        "points": [len(first["points"]), len(later["points"])],
        "reload": [first, after_reload],
    }


def _chat(tab: Tab, prompt: str, panes: int) -> list[dict[str, Any]]:
    """Send ``prompt`` from the playground; the streamed answers of the first ``panes``."""
    tab.page.get_by_label("Message", exact=True).fill(prompt)
    tab.page.get_by_label("Message", exact=True).press("Enter")
    answers = []
    for index in range(panes):
        answer = tab.finished_answer(index)
        answers.append(
            {
                "title": tab.page.locator(f'[data-pane="{index}"] [data-pane-title]').inner_text(),
                "text": answer.inner_text(),
                "chunks": int(answer.get_attribute("data-chunks") or 0),
                "error": answer.evaluate("el => el.parentNode.classList.contains('error')"),
            }
        )
    return answers


@pytest.mark.slow
def test_sign_in_upload_train_watch_and_chat(
    tab: Tab, smollm2: Any, workers: Callable[..., Workers]
) -> None:
    """The whole job by browser: report, job, live progress and curve (reload-proof), chat."""
    pool = workers(CARRY_ON_HEARTBEAT_INTERVAL="1", CARRY_ON_TORCH_THREADS="2")
    pool.start("all", "default,embed,train")
    user = UserFactory(username="ada")
    page = tab.page

    # Sign in.
    tab.go("/")
    page.wait_for_url(re.compile(r"/accounts/login/"))
    tab.assert_labelled()
    tab.shot("01-sign-in")
    tab.sign_in(user.username, PASSWORD)
    page.get_by_role("heading", name="Dashboard").wait_for()
    tab.shot("02-dashboard-empty")

    # Upload the demo dataset by drag and drop; the report and the preview follow.
    page.get_by_role("link", name="Datasets").first.click()
    tab.assert_labelled()
    tab.shot("03-datasets-empty")
    _drop_file(tab, "demo.jsonl", _demo_jsonl(24))
    page.wait_for_url(re.compile(r"/files/file-[A-Za-z0-9]+/$"))
    assert "No problems found" in page.inner_text("main")
    facts = page.locator("table.facts").inner_text()
    assert re.search(r"Valid examples\s+24", facts), facts
    assert re.search(r"Tokens\s+\d+", facts), facts
    assert "<|im_start|>assistant" in page.locator("pre.rendered").first.inner_text()
    tab.shot("04-dataset-report-valid")

    # A new job with small settings, so training is long enough to watch but short.
    page.get_by_role("link", name="Start job with this dataset").click()
    page.get_by_label("Epochs").fill("2")
    page.get_by_label("Batch size").fill("2")
    page.get_by_label("Seed").fill("0")
    page.get_by_label("Name suffix").fill("e2e")
    page.wait_for_function("() => /about/.test(document.getElementById('estimate').textContent)")
    tab.assert_labelled()
    tab.shot("05-new-job")
    page.get_by_role("button", name="Start job").click()
    page.wait_for_url(re.compile(r"/jobs/ftjob-[A-Za-z0-9]+/$"))

    # Watch it: the bar and the curve move; a reload mid-training shows the same.
    seen = _watch_training(tab)
    progress, points = seen["progress"], seen["points"]
    assert progress == sorted(progress), progress  # never goes back
    assert 0 < progress[0] < 100, progress  # shown live, mid-training
    assert points[-1] > points[0], points  # the curve gained points while watched
    before, after = seen["reload"]
    assert (after["status"], after["progress"]) == ("running", before["progress"])
    assert after["points"] == before["points"]  # a reload mid-training shows the same
    page.get_by_text("Chat with it in the playground").wait_for()
    job = FineTuningJob.objects.get()
    adapter = Adapter.objects.get(job=job)
    assert page.locator("#job-progress").get_attribute("value") == "100"
    assert len(json.loads(page.locator("svg.loss-curve").get_attribute("data-points"))) >= 2
    tab.shot("08-job-succeeded")

    # Chat with the adapter: the answer streams in.
    tab.open_playground(adapter.name, max_tokens=48)
    tab.assert_labelled()
    question = "Sam has 4 bags of 6 apples. How many apples does Sam have?"
    [single] = _chat(tab, question, panes=1)
    assert not single["error"], single
    assert single["text"].strip(), single
    assert single["chunks"] >= 2, single  # it arrived in pieces: streamed
    tab.shot("09-playground")

    # Side by side: one prompt, the base and the adapter answer.
    page.get_by_label("Side by side").check()
    page.get_by_role("button", name="New chat").click()
    assert page.get_by_label("Compare with").input_value() == smollm2.name
    left, right = _chat(tab, question, panes=2)
    assert (left["title"], right["title"]) == (adapter.name, smollm2.name)
    for answer in (left, right):
        assert not answer["error"], answer
        assert answer["text"].strip(), answer
    tab.shot("10-playground-side-by-side")

    # Adapters: rename, download the bundle.
    page.get_by_role("link", name="Adapters").first.click()
    page.get_by_label(re.compile("New name for")).fill("Arithmetic tutor")
    page.get_by_role("button", name="Rename").click()
    page.get_by_text("Renamed to “Arithmetic tutor”.").wait_for()
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download").click()
    download = download_info.value
    assert download.suggested_filename == "Arithmetic-tutor.zip"
    with zipfile.ZipFile(download.path()) as bundle:
        assert sorted(bundle.namelist()) == ["carry_on.safetensors", "carry_on_config.json"]
    tab.assert_labelled()
    tab.shot("11-adapters")

    # API keys: created and shown once, listed by prefix, revoked.
    page.get_by_role("link", name="API keys").click()
    page.get_by_label("Name").fill("laptop")
    page.get_by_role("button", name="Create key").click()
    raw = page.get_by_label("API key", exact=True).input_value()
    assert raw.startswith("sk-co-")
    tab.shot("12-api-keys-created")
    tab.go("/accounts/keys/")
    assert raw not in page.content()
    assert raw[:12] in page.inner_text("main")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name=re.compile("Revoke")).click()
    page.get_by_text("no longer works").wait_for()
    tab.assert_labelled()
    tab.shot("13-api-keys")

    # The lists, and the dashboard at a glance, on a desktop and at phone width.
    tab.go("/files/")
    tab.shot("14-datasets")
    tab.go("/jobs/")
    tab.shot("15-jobs")
    tab.go("/")
    main = page.inner_text("main")
    assert "Arithmetic tutor" in main
    assert "No job is running" in main
    tab.shot("16-dashboard")
    page.set_viewport_size(PHONE)
    tab.go("/")
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    tab.shot("17-dashboard-phone")
    tab.go(f"/jobs/{job.id}/")
    tab.shot("18-job-phone")

    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r"/accounts/login/"))


def test_malformed_upload_shows_the_line_numbered_report_and_trains_nothing(
    tab: Tab, tiny_base_model: Any
) -> None:
    """A bad file is stored with its report (line, problem, snippet); no job can start."""
    user = UserFactory()
    tab.sign_in(user.username, PASSWORD)
    tab.go("/files/")
    # Remember, across the navigation that follows, that the upload's progress bar showed.
    tab.page.evaluate(
        """() => new MutationObserver(() => {
            const box = document.querySelector('[data-upload-status]');
            if (!box.hidden) sessionStorage.setItem('progress-shown', 'yes');
        }).observe(document.querySelector('[data-upload-status]'), {attributes: true})"""
    )
    tab.page.get_by_label("JSONL dataset").set_input_files(
        files=[{"name": "bad.jsonl", "mimeType": "application/jsonl", "buffer": MALFORMED}]
    )
    tab.page.get_by_role("button", name="Upload and validate").click()
    tab.page.wait_for_url(re.compile(r"/files/file-[A-Za-z0-9]+/$"))
    assert tab.page.evaluate("() => sessionStorage.getItem('progress-shown')") == "yes"
    rows = tab.page.locator("table.report tbody tr").all_inner_texts()
    assert any(row.startswith("line 2") and "answer" in row for row in rows), rows
    assert any(row.startswith("line 3") and "{broken" in row for row in rows), rows
    assert tab.page.get_by_role("alert").first.inner_text().startswith("This file has")
    assert tab.page.get_by_role("link", name=re.compile("Start job")).count() == 0
    tab.shot("20-dataset-report-malformed")
    tab.go("/jobs/new/")
    assert "no validated dataset yet" in tab.page.inner_text("main")
    assert not FineTuningJob.objects.exists()


def test_pages_are_keyboard_usable_and_fit_a_phone(tab: Tab, tiny_base_model: Any) -> None:
    """A skip link, visible focus, labelled controls and no sideways scrolling at 390 px."""
    user = UserFactory()
    tab.sign_in(user.username, PASSWORD)
    tab.page.set_viewport_size(PHONE)
    for path in ("/", "/files/", "/jobs/", "/jobs/new/", "/adapters/", "/playground/",
                 "/accounts/keys/"):  # fmt: skip
        tab.go(path)
        tab.assert_labelled()
        width = tab.page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= PHONE["width"], (path, width)
    tab.go("/")
    tab.page.keyboard.press("Tab")
    focused = tab.page.evaluate("() => document.activeElement.textContent.trim()")
    assert focused == "Skip to content"
    outline = tab.page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"
    tab.page.keyboard.press("Enter")
    assert tab.page.evaluate("() => document.activeElement.id") == "main"

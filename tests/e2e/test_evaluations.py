"""Evaluations in a real browser on real workers: the base and two adapters side by side.

Headless Chromium against the live server, a real Celery worker consuming the embed queue,
and the real bundled base (SmolLM2-135M-Instruct). The adapters are real carry-on artifacts
on that base (random, perturbed: no training needed to compare them). Sizes are tiny (a few
examples, two problems, a dozen tokens); the figures the page shows must equal what
`python -m customization eval` prints for each model on the same file and options.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import DESKTOP, TIMEOUT_MS, Tab
from tests.factories import PASSWORD, FileFactory, UserFactory
from tests.helpers.celery_workers import Workers
from webapp.core.utils import data_path
from webapp.evaluations.models import Evaluation

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True),
]

OPTIONS = {"limit": 3, "max_length": 256, "exact_match": 2, "max_tokens": 12}


def _problems(n: int) -> bytes:
    from customization.demo_data import generate_demo_problems

    return "".join(json.dumps(row) + "\n" for row in generate_demo_problems(n, seed=7)).encode()


def _wait_until_finished(evaluation: Evaluation, pool: Workers, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not evaluation.is_terminal:
        assert time.monotonic() < deadline, f"still {evaluation.status}\n{pool.tail()}"
        time.sleep(0.5)
        evaluation.refresh_from_db()
    assert evaluation.status == "succeeded", f"{evaluation.error}\n{pool.tail()}"


def _cli_eval(base: Any, file: Any, adapter: Any, capsys: pytest.CaptureFixture[str]) -> Any:
    """`python -m customization eval` on the same file with the same options (one thread,
    as the worker runs)."""
    from customization import cli

    capsys.readouterr()
    argv = ["eval", str(data_path(file.path)), "--base", base.path, "--threads", "1"]
    if adapter is not None:
        argv += ["--adapter", str(data_path(adapter.path))]
    for option, value in OPTIONS.items():
        argv += [f"--{option.replace('_', '-')}", str(value)]
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _shown(tab: Tab) -> dict[str, dict[str, str]]:
    """The results table as the page shows it: model -> {loss, exact_match}."""
    rows = tab.page.locator("#results tbody tr")
    shown = {}
    for index in range(rows.count()):
        row = rows.nth(index)
        shown[str(row.get_attribute("data-model"))] = {
            field: row.locator(f'[data-field="{field}"]').inner_text().strip()
            for field in ("loss", "exact_match")
        }
    return shown


@pytest.mark.slow
def test_base_and_two_adapters_side_by_side_equal_the_cli_eval(
    tab: Tab,
    browser: Any,
    live_server: Any,
    smollm2: Any,
    make_adapter: Callable[..., Any],
    workers: Callable[..., Workers],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Pick an uploaded held-out file and three models, run on a real embed worker: the page
    shows each model's loss and exact match, equal to the CLI's; without JavaScript too."""
    pool = workers(CARRY_ON_TORCH_THREADS="1")
    pool.start("embed", "default,embed")
    user = UserFactory()
    file = FileFactory(owner=user, filename="held-out.jsonl", content=_problems(4))
    assert file.status == "processed", file.report
    adapters = [make_adapter(user, smollm2, seed=s, suffix=f"s{s}") for s in (1, 2)]
    models = [smollm2.name, *(a.name for a in adapters)]

    # The form, with JavaScript on.
    page = tab.page
    tab.sign_in(user.username, PASSWORD)
    page.get_by_role("link", name="Evaluations").click()
    page.get_by_role("link", name="New evaluation").click()
    page.get_by_label("Held-out dataset").select_option(file.id)
    for name in models:
        page.check(f'input[name="models"][value="{name}"]')
    page.get_by_label("Examples scored for loss").fill(str(OPTIONS["limit"]))
    page.get_by_label("Problems decoded for exact match").fill(str(OPTIONS["exact_match"]))
    page.get_by_label("Tokens per answer").fill(str(OPTIONS["max_tokens"]))
    page.get_by_label("Tokens per example").fill(str(OPTIONS["max_length"]))
    tab.assert_labelled()
    tab.shot("evaluations-01-form")
    page.get_by_role("button", name="Start evaluation").click()
    page.wait_for_url("**/evaluations/eval-*/")
    evaluation = Evaluation.objects.get(owner=user)
    _wait_until_finished(evaluation, pool)
    page.reload()
    # Retried until it holds: the running page's meta refresh may fire as it reloads.
    expect(page.locator("svg.evaluation-chart")).to_have_count(1)
    tab.shot("evaluations-02-results")

    # The figures: as stored, as shown, and as the CLI computes them.
    shown = _shown(tab)
    results = list(evaluation.results.order_by("position"))
    assert [r.model for r in results] == list(shown)  # in the form's order
    assert sorted(shown) == sorted(models)
    by_name = {a.name: a for a in adapters}
    for result in results:
        cli = _cli_eval(smollm2, file, by_name.get(result.model), capsys)
        assert result.loss == pytest.approx(cli["loss"], rel=1e-5)
        assert result.token_accuracy == pytest.approx(cli["token_accuracy"], rel=1e-5)
        assert result.exact_match == cli["exact_match"]
        assert cli["exact_match_problems"] == evaluation.n_problems == 2
        assert shown[result.model] == {
            "loss": f"{result.loss:.4f}",
            "exact_match": f"{result.n_correct}/2",
        }
    assert page.locator(".card.sample").count() == 2
    assert len({r.loss for r in results}) == 3

    # Without JavaScript: the same page, and a new evaluation through the plain form.
    context = browser.new_context(viewport=DESKTOP, java_script_enabled=False)
    context.set_default_timeout(TIMEOUT_MS)
    plain = Tab(page=context.new_page(), base_url=live_server.url)
    plain.sign_in(user.username, PASSWORD)
    plain.go(f"/evaluations/{evaluation.id}/")
    assert _shown(plain) == shown
    plain.go("/evaluations/new/")
    plain.page.get_by_label("Held-out dataset").select_option(file.id)
    plain.page.check(f'input[name="models"][value="{smollm2.name}"]')
    plain.page.get_by_label("Examples scored for loss").fill("2")
    plain.page.get_by_label("Problems decoded for exact match").fill("0")
    plain.page.get_by_role("button", name="Start evaluation").click()
    plain.page.wait_for_url("**/evaluations/eval-*/")
    second = Evaluation.objects.exclude(pk=evaluation.pk).get(owner=user)
    # The page reloads itself (a meta refresh, no script) until the evaluation has finished.
    plain.page.get_by_text("Succeeded", exact=True).wait_for(timeout=300_000)
    second.refresh_from_db()
    assert second.status == "succeeded", second.error
    assert _shown(plain)[smollm2.name]["loss"] == f"{second.results.get().loss:.4f}"
    assert _shown(plain)[smollm2.name]["exact_match"] == "not asked"
    plain.shot("evaluations-03-no-javascript")
    context.close()

"""The evaluation pages without JavaScript: the form, the page with models side by side,
the list, cancel; another user's evaluation is a 404; the admin shows the chart."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.factories import UserFactory, signed_in
from webapp.evaluations.models import Evaluation

pytestmark = pytest.mark.django_db


def test_the_form_runs_an_evaluation_and_its_page_shows_the_models_side_by_side(
    user: Any,
    tiny_base_model: Any,
    held_out: Any,
    two_adapters: list[Any],
    django_capture_on_commit_callbacks: Any,
) -> None:
    """Plain form post -> redirect -> a page with each model's figures, the chart and the
    sample answers; no script needed, and no refresh once it has finished."""
    client = signed_in(user)
    form = client.get("/evaluations/new/").content.decode()
    assert held_out.id in form
    for name in ["tiny", *(a.name for a in two_adapters)]:
        assert f'value="{name}"' in form
    models = ["tiny", two_adapters[0].name, two_adapters[1].name]
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/evaluations/new/",
            {"file": held_out.id, "models": models, "exact_match": "2", "max_tokens": "4",
             "limit": "4"},
        )  # fmt: skip
    evaluation = Evaluation.objects.get()
    assert response.status_code == 302
    assert response["location"] == f"/evaluations/{evaluation.id}/"
    assert evaluation.status == "succeeded", evaluation.error

    page = client.get(response["location"]).content.decode()
    assert 'http-equiv="refresh"' not in page
    assert 'class="evaluation-chart"' in page
    for result in evaluation.results.all():
        row = re.search(rf'<tr data-model="{re.escape(result.model)}">(.*?)</tr>', page, re.S)
        assert row is not None
        assert f"{result.loss:.4f}" in row.group(1)
        assert f"{result.n_correct}/2" in row.group(1)
    assert page.count('class="card sample"') == 2
    assert evaluation.problems[0]["prompt"][:40] in page
    listing = client.get("/evaluations/").content.decode()
    assert f"/evaluations/{evaluation.id}/" in listing


def test_a_running_evaluation_page_refreshes_itself_and_can_be_cancelled(
    user: Any, tiny_base_model: Any, held_out: Any
) -> None:
    """Without JavaScript the page reloads itself while queued; the cancel button works."""
    client = signed_in(user)
    response = client.post("/evaluations/new/", {"file": held_out.id, "models": ["tiny"]})
    evaluation = Evaluation.objects.get()
    page = client.get(response["location"]).content.decode()
    assert '<meta http-equiv="refresh" content="3">' in page
    cancelled = client.post(f"/evaluations/{evaluation.id}/cancel/", follow=True)
    assert "The evaluation was cancelled." in cancelled.content.decode()
    evaluation.refresh_from_db()
    assert evaluation.status == "cancelled"


def test_form_errors_are_shown_on_the_form(user: Any, tiny_base_model: Any, held_out: Any) -> None:
    """No model picked, or a bad option: 400 with the message beside the field."""
    client = signed_in(user)
    response = client.post("/evaluations/new/", {"file": held_out.id})
    assert response.status_code == 400
    assert "This field is required." in response.content.decode()
    response = client.post(
        "/evaluations/new/", {"file": held_out.id, "models": ["tiny"], "max_tokens": "99999"}
    )
    assert response.status_code == 400
    assert "max_tokens may be at most 512" in response.content.decode()
    assert not Evaluation.objects.exists()


def test_another_users_evaluation_page_is_404(
    user: Any, tiny_base_model: Any, held_out: Any
) -> None:
    """Isolation: the page and its cancel answer 404 to anyone but the owner."""
    signed_in(user).post("/evaluations/new/", {"file": held_out.id, "models": ["tiny"]})
    evaluation = Evaluation.objects.get()
    other = signed_in(UserFactory())
    assert other.get(f"/evaluations/{evaluation.id}/").status_code == 404
    assert other.post(f"/evaluations/{evaluation.id}/cancel/").status_code == 404


def test_the_admin_shows_an_evaluation_with_its_chart(
    user: Any, tiny_base_model: Any, held_out: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """Staff see every evaluation, its figures (read-only) and the chart."""
    with django_capture_on_commit_callbacks(execute=True):
        signed_in(user).post(
            "/evaluations/new/",
            {"file": held_out.id, "models": ["tiny"], "exact_match": "0", "limit": "2"},
        )
    evaluation = Evaluation.objects.get()
    staff = UserFactory(is_staff=True, is_superuser=True)
    page = signed_in(staff).get(f"/admin/evaluations/evaluation/{evaluation.id}/change/")
    assert page.status_code == 200
    assert 'class="evaluation-chart"' in page.content.decode()
    listing = signed_in(staff).get("/admin/evaluations/evaluation/")
    assert evaluation.id in listing.content.decode()

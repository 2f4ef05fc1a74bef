"""The live job page reads incrementally (only events after the last seq it has); the
loss curve survives non-finite values; file content is streamed, not read whole."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.test import Client
from rest_framework.test import APIClient

from tests.factories import PASSWORD, FileFactory, FineTuningJobFactory
from webapp.accounts.services import api_key_create
from webapp.core.utils import data_path
from webapp.customizations.charts import loss_curve_svg
from webapp.customizations.services.jobs import job_event_create

pytestmark = pytest.mark.django_db


def _client(user: Any) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def _step(job: Any, step: int, loss: float) -> None:
    job_event_create(
        job=job, type="metrics", message=f"Step {step}/10",
        data={"step": step, "total_steps": 10, "train_loss": loss},
    )  # fmt: skip


def test_the_live_endpoint_sends_only_the_events_after_the_last_seq(tiny_base_model: Any) -> None:
    """The first poll carries the whole log; the next ones only rows newer than last_seq."""
    job = FineTuningJobFactory(status="running", stage="training")
    job_event_create(job=job, message="Training started on 14 examples")
    client = _client(job.owner)
    first = client.get(f"/jobs/{job.id}/live/").json()
    assert "Training started" in first["events_html"]
    assert "event_rows_html" not in first

    job_event_create(job=job, message="Epoch 1/2 done")
    later = client.get(f"/jobs/{job.id}/live/", {"after": first["last_seq"]}).json()
    assert "events_html" not in later
    assert "Epoch 1/2 done" in later["event_rows_html"]
    assert later["last_seq"] > first["last_seq"]
    # Rows carry their seq, so the page drops the ones it already shows (the read overlaps).
    seqs = [int(seq) for seq in re.findall(r'data-seq="(\d+)"', later["event_rows_html"])]
    assert later["last_seq"] == max(seqs)
    page = client.get(f"/jobs/{job.id}/").content.decode()
    assert f'data-last-seq="{first["last_seq"]}"' not in page  # the page holds the newest
    assert f'data-last-seq="{later["last_seq"]}"' in page


def test_the_live_curve_grows_with_new_metrics_only(tiny_base_model: Any) -> None:
    """The curve is cached per job and extended by the metrics added since: same points as
    a full read, after each poll."""
    job = FineTuningJobFactory(status="running", stage="training")
    client = _client(job.owner)
    for step, loss in [(1, 2.0), (2, 1.5)]:
        _step(job, step, loss)
    assert client.get(f"/jobs/{job.id}/live/").json()["curve_points"] == 2
    _step(job, 3, 1.2)
    live = client.get(f"/jobs/{job.id}/live/").json()
    assert live["curve_points"] == 3
    drawn = live["curve_html"].split('data-points="')[1].split('"')[0].replace("&quot;", '"')
    assert json.loads(drawn) == [[1, 2.0, None], [2, 1.5, None], [3, 1.2, None]]


def test_the_loss_curve_leaves_out_nan_and_infinite_values() -> None:
    """A diverged run's points are dropped from the drawing instead of breaking the page."""
    points = [
        {"step": 1, "train_loss": 2.0},
        {"step": 2, "train_loss": float("nan")},
        {"step": 3, "train_loss": 1.0, "valid_loss": float("inf")},
    ]
    svg = str(loss_curve_svg(points, total_steps=4))
    drawn = json.loads(svg.split('data-points="')[1].split('"')[0].replace("&quot;", '"'))
    assert drawn == [[1, 2.0, None], [3, 1.0, None]]
    assert loss_curve_svg([{"step": 1, "train_loss": float("nan")}]) == ""


def test_file_content_is_streamed(tiny_base_model: Any) -> None:
    """GET /v1/files/{id}/content streams the stored bytes as an attachment."""
    file = FileFactory()
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=file.owner)[1]}")
    response = api.get(f"/v1/files/{file.id}/content")
    assert response.status_code == 200
    assert response.streaming
    body = b"".join(response.streaming_content)
    assert body == data_path(file.path).read_bytes()
    assert response["content-type"] == "application/octet-stream"
    assert f'filename="{file.id}.jsonl"' in response["content-disposition"]
    assert int(response["content-length"]) == len(body) == file.bytes

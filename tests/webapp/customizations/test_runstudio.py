"""``manage.py runstudio`` (what ``make run`` starts): its processes share one metrics
folder, and stopping it loses no usage record."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from django.conf import settings
from prometheus_client.parser import text_string_to_metric_families

from tests.factories import UserFactory
from tests.helpers.celery_workers import REPO, _database_url
from tests.helpers.servers import free_port, wait_healthy
from tests.webapp.api.conftest import lively_base_dir, lively_base_model  # noqa: F401
from webapp.accounts.services import api_key_create
from webapp.usage.models import UsageRecord

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.mark.usefixtures("lively_base_model")
def test_runstudio_serves_metrics_and_writes_usage_when_stopped(
    data_dir: Path, tmp_path: Path
) -> None:
    """Its web server reads the metrics folder it set up (emptied at start); stopped with
    SIGTERM right after a chat, it writes that chat's buffered usage record first."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_999999.db").write_bytes(b"stale")  # a previous run's: removed
    user = UserFactory()
    _, raw = api_key_create(user=user)
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "webapp.settings.test",
        "DATABASE_URL": _database_url(),
        "CARRY_ON_DATA_DIR": str(data_dir),
        "CARRY_ON_MODELS_DIR": str(settings.MODELS_DIR),
        "CARRY_ON_BUNDLED_BASE": "0",
        "CARRY_ON_TORCH_THREADS": "1",
        "CARRY_ON_METRICS_TOKEN": "runstudio-test-token",
        "CARRY_ON_USAGE_FLUSH_SECONDS": "3600",
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
    }
    log = tmp_path / "runstudio.log"
    with log.open("wb") as out:
        command = [sys.executable, "manage.py", "runstudio", "--no-worker"]
        proc = subprocess.Popen(
            [*command, "--addr", f"127.0.0.1:{port}"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log.read_text, what="runstudio", poll=0.3)
        assert not (folder / "counter_999999.db").exists()
        reply = requests.post(
            f"{url}/v1/chat/completions",
            json={"model": "lively", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {raw}"},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        scraped = requests.get(
            f"{url}/metrics", headers={"Authorization": "Bearer runstudio-test-token"}, timeout=30
        )
        assert scraped.status_code == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(scraped.text)
            for s in family.samples
        }
        assert (
            samples[("carry_on_chat_generated_tokens_total", (("model", "lively"),))]
            == (reply.json()["usage"]["completion_tokens"])
        )
        assert not UsageRecord.objects.filter(user=user).exists()  # still buffered
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    assert "wrote 1 buffered record(s) at exit" in log.read_text()
    [record] = UsageRecord.objects.filter(user=user)
    assert record.completion_tokens == reply.json()["usage"]["completion_tokens"]

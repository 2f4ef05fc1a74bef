"""Loopback load test of the web tier: concurrent uploads, job creations and chats.

    .venv/bin/python -m bench.load_bench            # the larger run
    .venv/bin/python -m bench.load_bench --quick    # a smoke-sized run

Starts a real server (gunicorn, gthread) on 127.0.0.1 over a fresh SQLite database and data
directory with the bundled base, then drives it from a thread pool: uploads (validated
datasets), job creations on the uploaded files (queued on an embedded broker; no worker
runs them: this measures the web tier), short chat completions; then bursts of
simultaneous chats past the serving engine's admission limit. A 429 is retried after its
``retry-after``, as a well-behaved client does. At the end every upload and job that got a
200 is looked up through the API: a missing one is a lost record.

Writes ``load.json`` and ``load.md`` into ``--out``. Traffic goes to 127.0.0.1 only and
every loop is bounded in count and time. ``run_load`` is also what the small CI load test
(tests/load/test_load_small.py) drives.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class LoadPlan:
    uploads: int = 20
    jobs: int = 10
    chats: int = 40
    concurrency: int = 8
    rows_per_upload: int = 10
    max_tokens: int = 8
    burst: int = 16  # simultaneous chats per burst
    bursts: int = 3
    burst_choices: int = 2  # n per burst request: each takes that many engine slots
    retries: int = 5  # per call, on 429
    max_retry_wait_s: float = 5.0
    deadline_s: float = 600.0


@dataclass
class Call:
    kind: str
    status: int  # the final one; 0: no HTTP answer (connection error, timeout)
    first_status: int
    seconds: float
    attempts: int = 1
    retry_after: str | None = None  # of the last 429, if any
    object_id: str | None = None
    error: str | None = None


@dataclass
class LoadReport:
    plan: dict[str, Any]
    calls: list[Call] = field(default_factory=list)
    bursts: list[Call] = field(default_factory=list)
    lost_uploads: list[str] = field(default_factory=list)
    lost_jobs: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def created(self, kind: str) -> set[str]:
        """Ids of the records the server said it created (200) for ``kind`` calls."""
        return {
            c.object_id for c in self.calls if c.kind == kind and c.status == 200 and c.object_id
        }

    def summary(self) -> dict[str, Any]:
        every = self.calls + self.bursts
        return {
            "plan": self.plan,
            "elapsed_s": round(self.elapsed_s, 2),
            "mixed": _by_kind(self.calls),
            "burst": _by_kind(self.bursts),
            "server_errors": sum(1 for c in every if c.status >= 500 or c.first_status >= 500),
            "no_answer": sum(1 for c in every if c.status == 0),
            "throttled_429": sum(1 for c in every if c.first_status == 429),
            "429_without_retry_after": sum(
                1 for c in every if c.first_status == 429 and not c.retry_after
            ),
            "lost_uploads": self.lost_uploads,
            "lost_jobs": self.lost_jobs,
        }


def _by_kind(calls: list[Call]) -> dict[str, Any]:
    kinds: dict[str, Any] = {}
    for kind in sorted({c.kind for c in calls}):
        mine = [c for c in calls if c.kind == kind]
        seconds = sorted(c.seconds for c in mine)
        kinds[kind] = {
            "requests": len(mine),
            "final_statuses": _counts(c.status for c in mine),
            "first_statuses": _counts(c.first_status for c in mine),
            "retried": sum(1 for c in mine if c.attempts > 1),
            "p50_s": round(statistics.median(seconds), 3),
            "p95_s": round(seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))], 3),
            "max_s": round(seconds[-1], 3),
        }
    return kinds


def _counts(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return dict(sorted(counts.items()))


# -- the client side ------------------------------------------------------------------------------


class Client:
    """One requests session per thread, every call bounded by a timeout."""

    def __init__(self, base_url: str, api_key: str, plan: LoadPlan):
        if not base_url.startswith(("http://127.0.0.1:", "http://localhost:")):
            raise ValueError("the load test only sends traffic to this machine (127.0.0.1)")
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.plan = plan
        self._local = threading.local()

    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        session: requests.Session = self._local.session
        return session

    def call(self, kind: str, method: str, path: str, *, retry: bool = True, **kwargs: Any) -> Call:
        started = time.perf_counter()
        first = 0
        retry_after = None
        for attempt in range(1, self.plan.retries + 2):
            try:
                response = self.session().request(
                    method, self.base_url + path, headers=self.headers, timeout=120, **kwargs
                )
            except requests.RequestException as exc:
                return Call(
                    kind,
                    0,
                    first or 0,
                    time.perf_counter() - started,
                    attempt,
                    retry_after,
                    error=f"{type(exc).__name__}: {exc}",
                )
            first = first or response.status_code
            if response.status_code == 429:
                retry_after = response.headers.get("retry-after")
                if retry and attempt <= self.plan.retries:
                    pause = float(retry_after or 1)
                    time.sleep(min(pause, self.plan.max_retry_wait_s))
                    continue
            object_id = None
            if response.status_code == 200 and "json" in response.headers.get("content-type", ""):
                object_id = response.json().get("id")
            return Call(
                kind,
                response.status_code,
                first,
                time.perf_counter() - started,
                attempt,
                retry_after,
                object_id,
            )
        raise AssertionError("unreachable")

    def listed_ids(self, path: str) -> set[str]:
        """Every id of a paginated list (bounded: at most 1,000 pages)."""
        ids: set[str] = set()
        after = None
        for _ in range(1000):
            params = {"limit": 100, **({"after": after} if after else {})}
            page = (
                self.session()
                .get(self.base_url + path, headers=self.headers, params=params, timeout=60)
                .json()
            )
            ids.update(item["id"] for item in page["data"])
            if not page["has_more"]:
                break
            after = page["last_id"]
        return ids


def _dataset(index: int, rows: int) -> bytes:
    from customization.demo_data import generate_demo_problems

    problems = generate_demo_problems(rows, seed=10_000 + index)
    return "".join(json.dumps(row) + "\n" for row in problems).encode()


def run_load(base_url: str, api_key: str, model: str, plan: LoadPlan) -> LoadReport:
    """Drive the server with ``plan``; every loop bounded in count and by ``deadline_s``."""
    client = Client(base_url, api_key, plan)
    report = LoadReport(plan=asdict(plan))
    started = time.perf_counter()
    deadline = started + plan.deadline_s

    def upload(i: int) -> Call:
        files = {"file": (f"load-{i}.jsonl", _dataset(i, plan.rows_per_upload))}
        return client.call(
            "upload", "POST", "/v1/files", files=files, data={"purpose": "fine-tune"}
        )

    def create_job(i: int, file_id: str) -> Call:
        body = {
            "model": model,
            "training_file": file_id,
            "suffix": f"load{i}",
            "hyperparameters": {"n_epochs": 1},
        }
        return client.call("job", "POST", "/v1/fine_tuning/jobs", json=body)

    def chat(i: int, *, n: int = 1, retry: bool = True, kind: str = "chat") -> Call:
        body = {
            "model": model,
            "max_tokens": plan.max_tokens,
            "temperature": 0,
            "n": n,
            "messages": [{"role": "user", "content": f"What is {i} + {i}?"}],
        }
        return client.call(kind, "POST", "/v1/chat/completions", json=body, retry=retry)

    # 1. mixed: uploads, then a job on each of the first uploaded files, chats all along
    with ThreadPoolExecutor(max_workers=plan.concurrency) as pool:
        waiting = {pool.submit(upload, i) for i in range(plan.uploads)}
        waiting |= {pool.submit(chat, i) for i in range(plan.chats)}
        jobs_sent = 0
        while waiting:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"{len(waiting)} requests still running at the deadline")
            done, waiting = wait(waiting, timeout=left, return_when=FIRST_COMPLETED)
            for future in done:
                call = future.result()
                report.calls.append(call)
                if call.kind == "upload" and call.object_id and jobs_sent < plan.jobs:
                    waiting.add(pool.submit(create_job, jobs_sent, call.object_id))
                    jobs_sent += 1

    # 2. bursts: simultaneous chats past the engine's admission limit, no retries
    for round_ in range(plan.bursts):
        if time.perf_counter() > deadline:
            break
        barrier = threading.Barrier(plan.burst)

        def burst_chat(i: int, barrier: threading.Barrier = barrier) -> Call:
            barrier.wait(timeout=60)
            return chat(i, n=plan.burst_choices, retry=False, kind="burst-chat")

        with ThreadPoolExecutor(max_workers=plan.burst) as pool:
            futures = [pool.submit(burst_chat, round_ * plan.burst + i) for i in range(plan.burst)]
            report.bursts += [f.result(timeout=300) for f in futures]

    # 3. nothing lost: every 200 is there, through the API
    report.lost_uploads = sorted(report.created("upload") - client.listed_ids("/v1/files"))
    report.lost_jobs = sorted(report.created("job") - client.listed_ids("/v1/fine_tuning/jobs"))
    report.elapsed_s = time.perf_counter() - started
    return report


# -- the benchmark: its own server over a fresh database ----------------------------------------


def _manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return done.stdout


def _serve(env: dict[str, str], port: int, workers: int, threads: int, log: Path) -> Any:
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "webapp.wsgi:application",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--worker-class",
        "gthread",
        "--threads",
        str(threads),
        "--timeout",
        "300",
    ]
    out = log.open("wb")
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"the server did not start; see {log}")


def _markdown(summary: dict[str, Any], server: dict[str, Any], machine: dict[str, Any]) -> str:
    lines = [
        "# Load test (loopback, web tier)",
        "",
        f"Server: gunicorn gthread, {server['workers']} workers x {server['threads']} threads, "
        f"engine admission limit {server['max_pending']} per process, base {server['base']}; "
        f"SQLite, embedded broker (jobs are queued, not run). Measured {summary['elapsed_s']} s "
        f"on {machine['cores']} cores shared with other work (load average at the end: "
        f"{machine['load_average_at_end']}): latencies are indicative only.",
        "",
        f"- server errors (5xx): **{summary['server_errors']}**; requests without an answer: "
        f"**{summary['no_answer']}**",
        f"- lost uploads: **{len(summary['lost_uploads'])}**; lost jobs: "
        f"**{len(summary['lost_jobs'])}**",
        f"- answered 429 (overload or rate limit): {summary['throttled_429']}, of which without "
        f"retry-after: {summary['429_without_retry_after']}",
        "",
        "| phase | kind | requests | first answers | final answers | retried | p50 s | p95 s "
        "| max s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in ("mixed", "burst"):
        for kind, row in summary[phase].items():
            lines.append(
                f"| {phase} | {kind} | {row['requests']} | {row['first_statuses']} | "
                f"{row['final_statuses']} | {row['retried']} | {row['p50_s']} | {row['p95_s']} "
                f"| {row['max_s']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from customization.base_model import BUNDLED_NAME

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke-sized run")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker")
    parser.add_argument("--max-pending", type=int, default=8, help="engine admission limit")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    plan = (
        LoadPlan(uploads=10, jobs=5, chats=20, burst=8, bursts=1)
        if args.quick
        else LoadPlan(
            uploads=100,
            jobs=50,
            chats=200,
            concurrency=16,
            rows_per_upload=50,
            max_tokens=16,
            burst=32,
            bursts=3,
        )
    )
    with tempfile.TemporaryDirectory(prefix="carry-on-load-") as tmp:
        work = Path(tmp)
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "webapp.settings.local",
            "DJANGO_DEBUG": "0",
            "DATABASE_URL": f"sqlite:///{work / 'db.sqlite3'}",
            "CARRY_ON_DATA_DIR": str(work / "data"),
            "CARRY_ON_MODELS_DIR": os.environ.get(
                "CARRY_ON_MODELS_DIR", str(REPO_ROOT / "data" / "base_models")
            ),
            "CELERY_BROKER_URL": "filesystem://",
            "CARRY_ON_TORCH_THREADS": "1",
            "CARRY_ON_SERVING_MAX_PENDING": str(args.max_pending),
            "CARRY_ON_RATE_LIMIT_PER_MINUTE": "100000",
        }
        env.pop("CARRY_ON_CACHE_URL", None)
        _manage(env, "migrate", "--no-input")
        _manage(env, "register_base_model", "bundled", "--default")
        output = _manage(env, "create_user", "load", "--key-name", "load")
        api_key = output.rsplit(":", 1)[-1].strip()
        port = _free_port()
        server = _serve(env, port, args.workers, args.threads, work / "server.log")
        try:
            report = run_load(f"http://127.0.0.1:{port}", api_key, BUNDLED_NAME, plan)
        finally:
            server.terminate()
            server.wait(timeout=30)
    summary = report.summary()
    server_facts = {
        "workers": args.workers,
        "threads": args.threads,
        "max_pending": args.max_pending,
        "base": f"{BUNDLED_NAME} (bundled)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "load_quick" if args.quick else "load"
    machine = _machine()
    result = {"server": server_facts, "machine": machine, **summary}
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n", "utf-8")
    (args.out / f"{name}.md").write_text(_markdown(summary, server_facts, machine), "utf-8")
    print(_markdown(summary, server_facts, machine))
    failed = summary["server_errors"] or summary["no_answer"] or summary["lost_uploads"]
    return 1 if failed or summary["lost_jobs"] else 0


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _machine() -> dict[str, Any]:
    import platform

    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


if __name__ == "__main__":
    sys.exit(main())

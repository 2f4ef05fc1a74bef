from __future__ import annotations

import platform
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from customization.base_model import load_base_model
from customization.errors import IncompatibleBaseModelError
from customization.runtime import (
    MALLOC_ARENAS,
    BaseCache,
    cap_malloc_arenas,
    on_own_thread,
    release_free_memory,
    resolve_device,
)


def test_an_explicit_device_is_kept() -> None:
    """A device named outright is used as given, whatever this machine has."""
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"


@pytest.mark.parametrize(("available", "expected"), [(True, "cuda"), (False, "cpu")])
def test_auto_picks_cuda_only_when_available(
    monkeypatch: pytest.MonkeyPatch, available: bool, expected: str
) -> None:
    """Asked for "auto", a machine with CUDA runs on it and one without on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert resolve_device("auto") == expected


def test_a_base_is_loaded_once_per_path_and_device(hf_base_dir: Path) -> None:
    """Asking twice for the same base on the same device returns the one loaded copy."""
    cache = BaseCache()
    first = cache.get(str(hf_base_dir), name="tiny", device="cpu")
    assert cache.get(str(hf_base_dir), name="tiny", device="cpu") is first
    assert first.device == torch.device("cpu")


def test_a_base_whose_files_changed_is_refused(hf_base_dir: Path) -> None:
    """A base no longer matching the fingerprint it was registered with is refused."""
    cache = BaseCache()
    key = load_base_model(hf_base_dir, name="tiny").fingerprint().key
    assert cache.get(str(hf_base_dir), name="tiny", device="cpu", fingerprint_key=key)
    with pytest.raises(IncompatibleBaseModelError, match="no longer match") as refused:
        cache.get(str(hf_base_dir), name="tiny", device="cpu", fingerprint_key="0" * 32)
    assert refused.value.param == "model"


def test_the_allocators_arenas_are_capped_on_glibc() -> None:
    """A model process keeps one malloc arena, so memory that request threads free under
    adapter churn is reused instead of kept per thread."""
    assert MALLOC_ARENAS == 1
    # Elsewhere (musl, macOS) there is no such knob and the call says so instead of failing.
    assert cap_malloc_arenas(MALLOC_ARENAS) is (platform.libc_ver()[0] == "glibc")


_FREED_INSIDE_THE_HEAP = """
from customization.runtime import release_free_memory
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
blocks = [bytearray(64 * 1024) for _ in range(2000)]  # 125 MiB of small heap blocks
keep = blocks[-1]  # the last one pins the top of the heap, so free() cannot shrink it
del blocks
held = rss()
released = release_free_memory()
print(released, held - rss())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_memory_freed_inside_the_heap_goes_back_to_the_system() -> None:
    """Blocks freed below a live one stay resident until released: the release hands
    their pages back (a fresh process, so the heap holds nothing else)."""
    out = subprocess.run(
        [sys.executable, "-c", _FREED_INSIDE_THE_HEAP],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout.split()
    assert out[0] == "True"
    assert int(out[1]) > 100 * 1024 * 1024


def test_releasing_free_memory_is_safe_anywhere() -> None:
    """Called with nothing to give back, or where the C library is not glibc, it says so
    with False instead of failing."""
    assert isinstance(release_free_memory(), bool)


def test_work_on_its_own_thread_returns_its_value_and_raises_its_error() -> None:
    """The work runs on another thread, which has ended when its value (or its exception)
    comes back to the caller."""
    ran_on: list[threading.Thread] = []

    def work() -> int:
        ran_on.append(threading.current_thread())
        return 42

    assert on_own_thread(work) == 42
    assert ran_on[0] is not threading.current_thread()
    assert not ran_on[0].is_alive()
    with pytest.raises(ValueError, match="bad input"):
        on_own_thread(lambda: int("bad input"))


# Run in a process of its own: in the test process other tests' threads come and go.
_POOLS_SCRIPT = """
import os, threading, torch
from customization.runtime import on_own_thread

def now():
    return len(os.listdir("/proc/self/task"))

def settles_at(count):  # an ended thread's OpenMP workers exit on their own, just after it
    for _ in range(500):
        if now() == count:
            return True
        threading.Event().wait(0.01)
    return False

torch.set_num_threads(2)
big = torch.ones(1 << 22)
before = now()
assert on_own_thread(lambda: float((big * 2).sum())) == 2.0 * big.numel()
print("own thread, workers gone:", settles_at(before))
done, release = threading.Event(), threading.Event()

def lives_on():
    float((big * 2).sum())
    done.set()
    release.wait(timeout=30)

keeper = threading.Thread(target=lives_on)
keeper.start()
done.wait(timeout=30)
print("thread living on, keeps a worker:", now() >= before + 2)
release.set()
keeper.join()
print("once it ends, workers gone:", settles_at(before))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_openmp_workers_made_on_its_own_thread_end_with_it() -> None:
    """A parallel torch op run through ``on_own_thread`` leaves no worker threads behind,
    while one run on a thread that lives on keeps its pool: the reason base loads and the
    benchmarks' own compute go through it."""
    completed = subprocess.run(
        [sys.executable, "-c", _POOLS_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines() == [
        "own thread, workers gone: True",
        "thread living on, keeps a worker: True",
        "once it ends, workers gone: True",
    ]

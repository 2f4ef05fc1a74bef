from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from customization.base_model import load_base_model
from customization.errors import IncompatibleBaseModelError
from customization.runtime import MALLOC_ARENAS, BaseCache, cap_malloc_arenas, resolve_device


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

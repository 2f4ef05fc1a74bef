"""The process runtime of whatever runs models: torch set-up, the device, bases loaded once.

Shared by the web server's serving engine and the Celery workers (through
``webapp.core.runtime``, which reads their settings) and usable as is by scripts. Like the
rest of ``customization`` it reads no settings: thread counts, device preferences and each
base's path and fingerprint come in as arguments. torch and transformers are imported in
function bodies, so importing this module is cheap for a process that never runs a model.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

if TYPE_CHECKING:
    import torch

    from customization.base_model import FrozenBase

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")


# glibc's M_ARENA_MAX (mallopt's parameter number) and the arenas a model process keeps.
_M_ARENA_MAX = -8
MALLOC_ARENAS = 1


def set_up_torch(threads: int) -> None:
    """Import torch and transformers, give torch ``threads`` intra-op threads (0: its
    default) and cap the C allocator's arenas (``cap_malloc_arenas``).

    Paying the imports up front, when a process starts, keeps the first task from spending
    its first half minute on them.
    """
    import torch
    import transformers  # noqa: F401 - imported for its side effect: paying the import cost

    cap_malloc_arenas(MALLOC_ARENAS)
    if threads > 0:
        torch.set_num_threads(threads)


def cap_malloc_arenas(arenas: int) -> bool:
    """Let glibc's malloc use at most ``arenas`` arenas from now on; False where the C
    library is not glibc.

    By default glibc gives threads up to eight arenas per core, and each arena keeps what
    its threads freed. Request threads load adapters (and free the evicted ones), so under
    adapter churn the serving process grew by far more than its adapter cache holds: over
    the same requests served hot, 175 MB more after 151 loads of 272 KiB adapters with a
    17 MB cache (245 MB with two arenas), against 4.5 MB with one (``bench.serve_bench``'s
    churn run, 8 clients; its tokens/s moved within run-to-run noise). Call it before the
    threads start.
    """
    libc = _glibc()
    return bool(libc.mallopt(_M_ARENA_MAX, arenas)) if libc is not None else False


@functools.cache
def _glibc() -> Any:
    """The C library where it is glibc (whose mallopt and malloc_trim are called), else None.

    Looked up once: ``find_library`` runs ``ldconfig`` in a subprocess (2.4 ms here, ten
    times the trim it would precede at every idle moment)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "gnu_get_libc_version") else None


def release_free_memory() -> bool:
    """Give the pages malloc holds free back to the operating system (glibc's
    ``malloc_trim``); False where the C library is not glibc.

    With one arena (``cap_malloc_arenas``) a serving process still kept what it had freed
    inside its heap: after serving requests over 1,000 adapters through a 17 MiB cache its
    resident set sat 66 to 107 MiB above the same requests served hot, though the cache
    itself stayed at its bound; a trim at the end handed back 126 MiB. Walking the heap
    took 0.1-0.3 ms here, yet grows with it, so the serving engine calls it when a busy
    spell ends and after each cache's worth of evicted adapters, not every step.
    """
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def in_own_mapping(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of the CPU ``tensors`` laid out in one anonymous memory mapping of their own
    (each at a 64-byte boundary), handed back to the operating system when the last of
    them is freed.

    For what lives a while and comes and goes often: the serving engine's adapters. Left
    to malloc, a loaded adapter's tensors land in the heap among the decode steps' short-
    lived buffers, and each page one of them holds stays resident after everything around
    it was freed (``malloc_trim`` can hand back only whole free pages). Under churn, with
    adapters loaded and evicted all the time, the heap's free but resident memory grew
    with them: the serving benchmark's process peaked tens of MiB above the same requests
    served hot, beyond its adapter cache's bound, however often it trimmed. In a mapping
    of its own an evicted adapter's pages go back whole.
    """
    import mmap

    import torch

    sizes = [-(-t.numel() * t.element_size() // 64) * 64 for t in tensors]
    if not sum(sizes):
        return [t.clone() for t in tensors]
    raw = torch.frombuffer(mmap.mmap(-1, sum(sizes)), dtype=torch.uint8)  # keeps the map
    copies, offset = [], 0
    for tensor, size in zip(tensors, sizes, strict=True):
        nbytes = tensor.numel() * tensor.element_size()
        copy = raw[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
        copy.copy_(tensor)
        copies.append(copy)
        offset += size
    return copies


def freeze_long_lived_objects() -> int:
    """Move every object alive now out of the cyclic collector's reach (``gc.freeze``, a
    constant-time move); returns how many objects are frozen.

    A loaded base is a few hundred thousand Python objects (modules, parameters, the
    tokenizer), all alive for the process's life. Left in the oldest generation, each full
    collection walked all of them: 220-270 ms on this machine, triggered every so often by
    the objects decode steps make (one ran inside a long prompt's join in a side run): a
    likely share of the one slow step in about a hundred. Frozen, a full collection walks
    only what came after. The serving engine calls it after each base it loads and
    ``unfreeze_objects`` at shutdown (process-wide: a second engine in the same process
    loses the freeze when the first shuts down, which costs it speed, not correctness).
    Objects that die by reference count are freed as ever; cycles among the frozen wait for
    the unfreeze (no collection first: that is the quarter-second walk this avoids).
    """
    gc.freeze()
    return gc.get_freeze_count()


def unfreeze_objects() -> None:
    """Give the frozen objects back to the collector (their cycles can be collected again)."""
    gc.unfreeze()


def on_own_thread(work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``work(*args, **kwargs)``, run on a thread of its own that ends when it returns
    (its exception is raised here), so the OpenMP workers it made end with it.

    torch's CPU builds parallelise with libgomp, which gives every thread that runs a
    parallel region its own pool of worker threads and keeps the pool until that thread
    ends. Once the process holds more of those workers than it has cores, libgomp makes
    every pool wait for work by sleeping almost at once instead of spinning, and each of
    the hundreds of small parallel regions in a decode step then pays a wake-up. So a
    process that decodes keeps one pool: the decode thread's. Loading a base (which
    computes) on a request thread that lives on would leave a second pool behind: with
    the main thread's pool alive, a batch of 8 rows stepped on the decode thread in 143 ms
    (base rows) and 204 ms (carry-on and tail rows) against 96 and 110 ms on the main
    thread itself; with no other pool, 111 and 105 ms.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work(*args, **kwargs))
        except BaseException as exc:  # handed to the caller, whatever it was
            failure.append(exc)

    thread = threading.Thread(target=run, name="compute-once")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def resolve_device(preference: str) -> str:
    """The device to run on: ``preference`` itself ("cpu", "cuda:1", ...), or for "auto"
    CUDA when this machine has it and the CPU otherwise."""
    if preference != "auto":
        return preference
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class BaseCache:
    """Frozen bases loaded once per process, keyed by (path, device), shared by every caller.

    Loading holds the lock, so threads asking for the same base at once load it once. A base
    registered with a fingerprint is checked against it on every lookup, so files replaced
    under the same path are refused rather than served as the base they no longer are.
    """

    def __init__(self) -> None:
        self._bases: dict[tuple[str, str], FrozenBase] = {}
        self._lock = threading.Lock()

    def get(
        self,
        path: str,
        *,
        name: str,
        device: str,
        revision: str | None = None,
        fingerprint_key: str = "",
    ) -> FrozenBase:
        """The base at ``path`` on ``device``, loading it on first use; raises
        ``IncompatibleBaseModelError`` when its files no longer match ``fingerprint_key``."""
        from customization.base_model import load_base_model
        from customization.errors import IncompatibleBaseModelError

        key = (path, device)
        with self._lock:
            if key not in self._bases:
                logger.info("loading base model %s from %s on %s", name, path, device)

                # On its own thread (the caller may be a request thread that lives on),
                # with the fingerprint that every lookup checks computed there too.
                def load() -> FrozenBase:
                    base = load_base_model(
                        path, name=name, revision=revision or None, device=device
                    )
                    base.fingerprint()
                    return base

                self._bases[key] = on_own_thread(load)
            base = self._bases[key]
        if fingerprint_key and base.fingerprint().key != fingerprint_key:
            raise IncompatibleBaseModelError(
                f"the files of base model {name!r} at {path} no longer match the "
                "fingerprint it was registered with; register it again",
                param="model",
            )
        return base

"""Chat completions: resolve the model (with its permission check), then decode.

The request is validated by the API layer; here the model name becomes a base and an
optional carry-on artifact the caller may use, the messages become prompt tokens, and the
request is submitted to the process's serving engine, which batches it with others.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

from django.conf import settings

from webapp.accounts.models import ApiKey, User
from webapp.core.exceptions import ApplicationError
from webapp.core.utils import data_path
from webapp.customizations.selectors import ServableModel, model_resolve
from webapp.serving.engine import get_engine
from webapp.serving.metering import ChatMeter, chat_outcome


class EngineBusyError(ApplicationError):
    status = 429
    type = "requests"
    retry_after = 1


class _UserSlots:
    """Choices each user has waiting or decoding in this process's engine.

    A user holds at most SERVING_MAX_PER_USER of the engine's SERVING_MAX_PENDING slots, so
    one user's burst (with any number of keys) leaves room for everyone else.
    """

    def __init__(self) -> None:
        self._held: dict[Any, int] = {}
        self._lock = threading.Lock()

    def take(self, user: Any, n: int) -> None:
        limit = int(settings.CARRY_ON["SERVING_MAX_PER_USER"])
        if n > limit:  # could never be admitted: not worth a retry
            raise ApplicationError(
                f"n may be at most {limit} on this server (CARRY_ON_SERVING_MAX_PER_USER)",
                param="n",
            )
        with self._lock:
            held = self._held.get(user.pk, 0)
            if held + n > limit:
                raise EngineBusyError(
                    f"You have {held} chat completion choices in flight on this server, and "
                    f"one user may have {limit} (CARRY_ON_SERVING_MAX_PER_USER); retry when "
                    "one has finished.",
                    code="user_concurrency_limit",
                )
            self._held[user.pk] = held + n

    def give_back(self, user_pk: Any, n: int) -> None:
        with self._lock:
            left = self._held.get(user_pk, 0) - n
            if left > 0:
                self._held[user_pk] = left
            else:
                self._held.pop(user_pk, None)

    def held(self, user: Any) -> int:
        with self._lock:
            return self._held.get(user.pk, 0)


user_slots = _UserSlots()


class HeldCompletion:
    """The engine's Completion, holding its user's slots until it ends: consumed to the end
    (``events``/``result``), cancelled, or dropped unconsumed (garbage collected).

    Its meter sees every event on the way through and records the chat once it ends: how
    it ended, its tokens and its timings (webapp/serving/metering.py).
    """

    def __init__(self, completion: Any, user_pk: Any, n: int, meter: ChatMeter | None = None):
        self._completion = completion
        self._user_pk, self._n, self._meter = user_pk, n, meter
        # Dropped unconsumed: nobody is left to read it, as when the client went away.
        self._release = weakref.finalize(
            self, _held_end, user_pk, n, meter, completion, "disconnected"
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._completion, name)

    def _end(self, outcome: str) -> None:
        """Release and record once, whichever way the completion ends first. A client
        that leaves after every choice has finished got its whole answer."""
        reasons = self._meter.finish_reasons if self._meter is not None else []
        if outcome == "disconnected" and len(reasons) >= self._n:
            outcome = chat_outcome(reasons)
        if self._release.detach() is not None:
            _held_end(self._user_pk, self._n, self._meter, self._completion, outcome)

    def events(self, timeout: float = 300.0) -> Iterator[Any]:
        meter = self._meter
        try:
            for event in self._completion.events(timeout):
                if meter is not None:
                    if event.text or event.token_id is not None:
                        meter.token()
                    if event.finish_reason is not None:
                        meter.finished(event.finish_reason)
                yield event
        except Exception:
            self._end("error")
            raise
        finally:
            # After every choice finished this reads "stop" or "length" (see _end); before
            # that, the consumer left. A no-op after an error.
            self._end("disconnected")

    def result(self, timeout: float = 300.0) -> list[tuple[str, str]]:
        """(text, finish_reason) per choice, waiting for the end."""
        from customization.serving import collect_choices

        return collect_choices(self.events(timeout), self._completion.n)

    def cancel(self) -> None:
        self._completion.cancel()
        self._end("disconnected")


def _held_end(user_pk: Any, n: int, meter: ChatMeter | None, completion: Any, outcome: str) -> None:
    """A held completion ended: give its slots back, then record it."""
    user_slots.give_back(user_pk, n)
    if meter is not None:
        meter.end(
            outcome,
            prompt_tokens=int(completion.prompt_tokens),
            completion_tokens=int(completion.completion_tokens),
        )


@dataclasses.dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: Sequence[str] = ()
    seed: int | None = None
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


@dataclasses.dataclass
class SubmittedChat:
    model: ServableModel
    completion: Any  # customization.serving.Completion


def _adapter_ref(model: ServableModel) -> Any:
    from customization.serving import AdapterRef

    if model.path is None or model.sha256 is None or model.adapter_id is None:
        return None
    return AdapterRef(adapter_id=model.adapter_id, path=data_path(model.path), sha256=model.sha256)


def chat_completion_submit(
    *, user: User, request: ChatRequest, api_key: ApiKey | None = None
) -> SubmittedChat:
    """Check access, tokenize and queue the request; raises ApplicationError on refusal.

    Every chat that gets past the model check is metered from here to its end (``api_key``
    None: the browser's session).
    """
    model = model_resolve(user=user, name=request.model)
    meter = ChatMeter(
        user_id=user.pk,
        api_key_id=api_key.pk if api_key is not None else None,
        model=model.name,
        base=model.base.name,
        adapter=model.adapter_id if model.adapter_id == model.name else None,
    )
    try:
        completion = _submit(user, model, request)
    except BaseException as exc:
        meter.refused(getattr(exc, "status", 500))
        raise
    meter.admitted()
    return SubmittedChat(
        model=model, completion=HeldCompletion(completion, user.pk, request.n, meter)
    )


def _submit(user: User, model: ServableModel, request: ChatRequest) -> Any:
    """Tokenize, take the user's slots and queue the request in the engine."""
    from customization.config import GenerationConfig
    from customization.errors import (
        ArtifactError,
        ContextLengthError,
        CustomizationError,
        EngineOverloaded,
        IncompatibleBaseModelError,
    )

    engine = get_engine()
    try:
        prompt = engine.encode_chat(model.base.name, request.messages)
        context = engine.base(model.base.name).max_position_embeddings
        default_max = int(settings.CARRY_ON["SERVING_DEFAULT_MAX_TOKENS"])
        config = GenerationConfig(
            max_new_tokens=request.max_tokens or max(1, min(default_max, context - len(prompt))),
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=tuple(request.stop),
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
        )
        user_slots.take(user, request.n)
        try:
            return engine.submit(
                model.base.name, prompt, config, adapter=_adapter_ref(model), n=request.n
            )
        except BaseException:
            user_slots.give_back(user.pk, request.n)
            raise
    except EngineOverloaded as exc:
        raise EngineBusyError(exc.message, code="engine_overloaded") from exc
    except ContextLengthError as exc:
        raise ApplicationError(exc.message, param="messages", code=exc.code) from exc
    except (ArtifactError, IncompatibleBaseModelError) as exc:
        raise ApplicationError(
            f"The model '{request.model}' cannot be served: {exc.message}",
            code=exc.code,
            status=500,
            type="server_error",
        ) from exc
    except CustomizationError as exc:
        raise ApplicationError(exc.message, param=exc.param, code=exc.code) from exc
    except ValueError as exc:  # GenerationConfig's range checks
        raise ApplicationError(str(exc), code="invalid_value") from exc


def engine_counters(base_name: str) -> dict[str, int]:
    """The engine's work counters for a base (observability and tests)."""
    counters: dict[str, int] = get_engine().counters(base_name).as_dict()
    return counters

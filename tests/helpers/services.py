"""Where a test needs a service this machine may lack (PostgreSQL, a network broker,
Chromium): skip it, saying so, or (CARRY_ON_REQUIRE_SERVICES=1, set by .ci/run) fail it, so
that CI can never pass with those tests quietly skipped."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_ENV = "CARRY_ON_REQUIRE_SERVICES"


def services_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") == "1"


def service_missing(reason: str) -> NoReturn:
    """Skip the test for ``reason``, or fail it where services are required."""
    if services_required():
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: this test must run here)", pytrace=False)
    pytest.skip(reason)

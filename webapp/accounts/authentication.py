"""Bearer API-key authentication for DRF (``Authorization: Bearer sk-co-...``)."""

from __future__ import annotations

from typing import Any

from rest_framework import authentication, exceptions
from rest_framework.request import Request

from webapp.accounts.selectors import api_key_authenticate
from webapp.accounts.services import api_key_touch


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Malformed Authorization header.")
        try:
            raw = header[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed("Invalid API key.") from None
        key = api_key_authenticate(raw_key=raw)
        if key is None:
            raise exceptions.AuthenticationFailed("Incorrect API key provided.")
        api_key_touch(api_key=key)
        return key.user, key

    def authenticate_header(self, request: Request) -> str:
        return self.keyword

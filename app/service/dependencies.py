"""FastAPI dependencies of the routes: the app's shared state and the API key check.

Both are ``async``: a sync dependency would cost every request a thread-pool round trip. The
generation service is taken from the state inside a route (``state.ready()``, 503 while no
bundle is loaded), after FastAPI has validated the body, so a bad request is a 422 whether or
not a model is loaded.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader

from app.service.middleware import key_is_valid
from app.service.state import ServiceState

__all__ = ["KEY_HEADER", "State", "get_state", "require_key"]

KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False,
                          description="Required when the deployment sets an API key.")


async def get_state(request: Request) -> ServiceState:
    """The app's :class:`ServiceState` (set by :func:`app.service.api.create_app`)."""
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]


async def require_key(state: State, key: Annotated[str | None, Depends(KEY_HEADER)]) -> None:
    """401 unless the request carries the deployment's API key (when it sets one)."""
    api_key = state.settings.api_key
    if api_key and not key_is_valid(key, api_key):
        raise HTTPException(401, "missing or wrong X-API-Key",
                            headers={"WWW-Authenticate": "APIKey"})

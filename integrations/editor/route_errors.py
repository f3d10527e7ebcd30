"""What the llama.cpp-shaped routes share (integrations/editor/http.py, integrations/editor/token_routes.py):
llama.cpp's error body {"error": {"code", "message", "type"}} with the message naming the field
("Field 'n_cmpl': ..."), the body read and validated as a pydantic model, and the app's request limits.
"""

from __future__ import annotations

import logging

from fastapi import Request
from pydantic import BaseModel, ValidationError

from integrations.http_errors import APIError, api_field, engine_message, from_engine_error, llama_error_body
from integrations.request_body import read_json_object
from integrations.request_limits import InputError, RequestLimits
from integrations.validation_errors import also_missing, validation_field, validation_message
from scheduler.api import InvalidRequestError

log = logging.getLogger(__name__)


def error_body(exc: Exception, endpoint: str | None = None) -> tuple[int, dict, dict]:
    """(status, llama.cpp error body, headers) of a failure on a llama.cpp-shaped route (its type names:
    http_errors.llama_error_body). Input faults name the field; engine and Ray errors map as in
    integrations/http_errors.py; anything else is a bug (logged, 500)."""
    if isinstance(exc, InputError):
        status, message, kind, headers = exc.status, field_message(exc.field, exc.message), "invalid_request_error", {}
    elif isinstance(exc, APIError):
        status, message, kind, headers = exc.status, exc.message, exc.type, exc.headers
    elif isinstance(exc, InvalidRequestError):  # in the route's words (llama.cpp's fields)
        message = field_message(api_field(exc.field, endpoint), engine_message(exc, endpoint))
        status, kind, headers = 400, "invalid_request_error", {}
    else:
        api = from_engine_error(exc, endpoint)
        if api.status >= 500 and api.type == "server_error":
            log.error("%s failed", "/" + endpoint if endpoint else "llama.cpp route", exc_info=exc)
        status, message, kind, headers = api.status, api.message, api.type, api.headers
    # llama.cpp's type names: a stream's last event says what the same fault's response says (RouteErrorShape)
    return status, llama_error_body(status, kind, message), headers


def field_message(field: str | None, message: str) -> str:
    return f"Field '{field}': {message}" if field else message


async def read_body(request: Request, model: type[BaseModel]):
    """The body validated as `model`; raises InputError naming the field. Validators read the app's
    root_path (http_options.root_path) from the validation context, to name a route as it is served."""
    data = await read_json_object(request)
    try:
        return model.model_validate(data, context={"root_path": request.scope.get("root_path", "")})
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        field = validation_field(tuple(errors[0]["loc"]))
        raise InputError(400, field, validation_message(errors[0]) + also_missing(errors, field)) from None


def app_limits(request: Request) -> RequestLimits:
    """The app's limits (openai_api.APISettings); defaults when the router runs on its own (tests)."""
    settings = getattr(request.app.state, "settings", None)
    return settings.limits if settings is not None else RequestLimits()

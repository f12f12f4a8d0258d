"""OpenAI-shaped errors of ``lorakit serve``: ``{"error": {"message", "type", "param", "code"}}`` with OpenAI's status
codes, and the one-line reasons given for invalid request bodies and failed adapter loads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse

from lorakit.serve.protocol import NOT_IMPLEMENTED_FIELDS, ErrorResponse

INVALID = "invalid_request_error"


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return ErrorResponse.of(self.message, self.type, self.param, self.code).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


# ------------------------------------------------------------------------------------------ detokenization


class EngineFailure(Exception):
    """The engine ended a request with an error (or dropped it while shutting down)."""


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _field_path(location: Sequence[Any]) -> list[str]:
    """A pydantic error location as the request's field path: without ``body`` and union member tags
    (``str``, ``list[int]``, ``TextPart``, ...), which name a type, not a field."""
    path = []
    for part in location:
        if isinstance(part, int):
            path.append(str(part))
        elif part != "body" and not ("[" in part or part in _TYPE_TAGS or part[:1].isupper()):
            path.append(part)
    return path


def validation_message(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """OpenAI-style message and ``param`` for pydantic's validation errors of a request body.

    One error is reported: the first, or for a field with several (one per member of a union type) the one that
    got deepest into the value, which is usually the member the client meant.
    """
    first = errors[0]
    same_field = [e for e in errors if tuple(e.get("loc", ()))[:2] == tuple(first.get("loc", ()))[:2]]
    error = max(same_field, key=lambda e: len(e.get("loc", ())))
    location = _field_path(error.get("loc", ()))
    param = ".".join(location) or None
    kind = error.get("type", "")
    if kind == "json_invalid":
        return (
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
            "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid "
            f"JSON.) {error.get('msg', '')}".strip(),
            None,
        )
    if kind == "extra_forbidden" and param:
        name = location[-1]
        if len(location) == 1 and name in NOT_IMPLEMENTED_FIELDS:
            return f"'{name}' is not supported by lorakit serve.", param
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "missing":
        if param is None:
            return "The request has no body; expected a JSON object.", None
        return f"Missing required parameter: '{param}'.", param
    if kind == "model_attributes_type" and not location:
        return "The request body must be a JSON object.", None
    value = error.get("input")
    shown = (
        json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    )
    return f"Invalid value for '{param}': {error.get('msg', 'invalid')} (got {shown}).", param


def reason_of(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    if isinstance(error, (OSError, ValueError)) or type(error).__module__.startswith("lorakit."):
        return str(error) or type(error).__name__
    return f"{type(error).__name__}: {error}"


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)

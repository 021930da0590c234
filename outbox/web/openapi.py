"""The OpenAPI 3.1 document of ``outbox gateway`` (served on ``/openapi.json``).

Written by hand rather than generated: the API is the device's, with its odd corners (a 200
``{}`` for "not understood", empty 401/405 bodies, every path taking every command), and the
document has to say exactly that for clients and for the schemathesis run in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from outbox import __version__

COMMAND_NAMES = [
    "send-sms", "send-email", "send-mail", "send-message", "block-msisdn", "unblock-msisdn",
    "create-otp", "request-otp", "validate-otp", "verify-otp",
]

_TEXT_OR_NUMBER: dict[str, Any] = {"type": ["string", "number"]}

_DATA: dict[str, Any] = {
    "type": "object",
    "description": "What the command needs (PROTOCOL.md section 1); other fields are kept as "
                   "given. Times are Unix seconds.",
    "properties": {
        "receiver": {"type": "string", "description": "an MSISDN or an e-mail address"},
        "message": {"type": "string",
                    "description": "the text; for create-otp exactly one %s for the code"},
        "subject": {"type": "string"},
        "reference": _TEXT_OR_NUMBER,
        "otp": _TEXT_OR_NUMBER,
        "expiration": {"type": ["number", "string"],
                       "description": "absolute Unix seconds (milliseconds are refused)"},
        "date_time": {"type": ["number", "string"]},
        "id": {"type": ["string", "number"],
               "description": "the idempotency key when no Idempotency-Key header is sent"},
        **{f"param{index}": _TEXT_OR_NUMBER for index in range(1, 5)},
    },
}

_COMMAND_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["command", "data"],
    "properties": {
        "command": {"type": "string", "enum": COMMAND_NAMES},
        "data": _DATA,
    },
    "description": "Read whatever the Content-Type says (the PHP client sends none); parsed "
                   "as JSON5, so trailing commas and single-quoted strings are accepted as by "
                   "the device's org.json.",
}

_ANSWER: dict[str, Any] = {
    "oneOf": [
        {
            "type": "object",
            "required": ["command", "response_code", "data"],
            "properties": {
                "command": {"type": "string"},
                "response_code": {
                    "type": "string", "pattern": "^[0-9]{4}$",
                    "description": "0000 durably accepted (send, block, create) or valid "
                                   "(validate); 1201 duplicate live OTP reference; 1202 "
                                   "invalid OTP; 1203 expired; 1204 locked (managed mode); "
                                   "device mode may pass on the device's other codes",
                },
                "data": {
                    "type": "object",
                    "required": ["date_time", "receiver"],
                    "properties": {
                        "date_time": {"type": "integer"},
                        "receiver": {"type": "string"},
                        "reference": {"type": "string"},
                    },
                },
            },
        },
        {"type": "object", "maxProperties": 0,
         "description": "{}: not understood (bad JSON, no command or data, an unknown "
                        "command), as the device answers"},
    ],
}

_REFUSAL: dict[str, Any] = {
    "type": "object",
    "required": ["command", "rule", "error"],
    "properties": {
        "command": {"type": ["string", "null"]},
        "rule": {"type": "string", "minLength": 1,
                 "description": "the broken rule: the same names as outbox.InvalidCommand.rule "
                                "and the database's constraints (message_receiver_msisdn, ...), "
                                "or gateway_*/database_unavailable"},
        "error": {"type": "string"},
    },
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _operation(path: str, method: str) -> dict[str, Any]:
    return {
        "operationId": f"{method}_{path.strip('/').replace('/', '_')}",
        "summary": "Any OTP-Pi command (every path takes every command)",
        "security": [{"basic": []}],
        "parameters": [{
            "name": "Idempotency-Key", "in": "header", "required": False,
            "schema": {"type": "string", "maxLength": 200},
            "description": "makes a retry answer like the first request, without a second row "
                           "(default: data.id); scoped per gateway user",
        }],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _COMMAND_BODY},
            "application/x-www-form-urlencoded": {"schema": _COMMAND_BODY},
        }},
        "responses": {
            "200": _json(_ANSWER, "the device's answer"),
            "400": _json(_REFUSAL, "the outbox refuses the command: rule names why"),
            "401": {"description": "bad or missing credentials (empty body)"},
            "409": _json(_REFUSAL, "the idempotency key was used for another command"),
            "413": _json(_REFUSAL, "body too large"),
            "503": _json(_REFUSAL, "the database (or, for a device-mode OTP, the device) "
                                   "cannot answer now: retry with the same key"),
        },
    }


def document(paths: Sequence[str]) -> dict[str, Any]:
    api: dict[str, Any] = {
        path: {"post": _operation(path, "post"), "put": _operation(path, "put")}
        for path in paths
    }
    api["/livez"] = {"get": {"operationId": "livez", "summary": "the process answers",
                             "responses": {"200": {"description": "alive"}}}}
    api["/readyz"] = {"get": {"operationId": "readyz",
                              "summary": "the database answers and the users file reads",
                              "responses": {"200": {"description": "ready"},
                                            "503": {"description": "not ready, with why"}}}}
    api["/metrics"] = {"get": {"operationId": "metrics", "summary": "Prometheus metrics",
                               "responses": {"200": {"description": "exposition"}}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "outbox gateway",
            "version": __version__,
            "description": "OTP-Pi's REST API in front of the outbox: 0000 means the command "
                           "is durably accepted (committed), not delivered.",
        },
        "components": {"securitySchemes": {"basic": {"type": "http", "scheme": "basic"}}},
        "paths": api,
    }


__all__ = ["COMMAND_NAMES", "document"]

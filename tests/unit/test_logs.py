from __future__ import annotations

import io
import json

import structlog

from outbox import logs


def render(**event: object) -> dict[str, object]:
    stream = io.StringIO()
    logs.configure(level="debug", fmt="json", stream=stream)
    try:
        logs.get_logger("test").info("message.failed", **event)
    finally:
        logs.configure(level="debug", fmt="json")
    return json.loads(stream.getvalue())  # type: ignore[no-any-return]


def test_receivers_texts_codes_and_secrets_are_masked_at_any_depth() -> None:
    line = render(receiver="+6281234567890", message="Your code is 123456", otp="123456",
                  data={"receiver": "ann@example.com", "subject": "Receipt",
                        "nested": [{"code": "654321"}]},
                  password="hunter2", id=7)
    text = json.dumps(line)
    for secret in ("6281234567890", "Your code", "123456", "ann@example", "Receipt", "654321",
                   "hunter2"):
        assert secret not in text
    assert line["receiver"] == "***90"
    assert line["id"] == 7
    assert line["event"] == "message.failed"


def test_short_receivers_are_masked_whole() -> None:
    assert logs.mask_receiver("1234") == "***"
    assert logs.mask_receiver("") == ""


def test_debug_enabled_follows_the_level() -> None:
    logs.configure(level="info", fmt="json")
    try:
        assert not logs.debug_enabled()
    finally:
        logs.configure(level="debug", fmt="json")
    assert logs.debug_enabled()
    assert structlog.is_configured()

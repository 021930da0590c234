"""The console's pure parts: Basic credentials, roles, the origin check, tokens, the chart,
filters from a form, and how ages read."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from outbox.admin import FailedFilter
from outbox.dashboard import MinuteOutcomes, describe_filter, filter_record, pool_states
from outbox.web.console import (
    BadRequest,
    CsrfTokens,
    chart,
    filter_query,
    format_age,
    parse_basic,
    parse_filter,
    role_of,
    same_origin,
)


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def test_parse_basic() -> None:
    assert parse_basic(basic("olga:pa:ss")) == ("olga", "pa:ss")
    assert parse_basic(basic("olga:")) == ("olga", "")
    assert parse_basic("basic " + base64.b64encode(b"a:b").decode()) == ("a", "b")
    for header in ("", "Bearer xyz", "Basic", "Basic !!!", basic("no-colon"), basic(":pw"),
                   "Basic " + base64.b64encode(b"\xff:\xfe").decode()):
        assert parse_basic(header) is None, header


def test_roles_default_to_viewer() -> None:
    assert role_of("operator") == "operator"
    assert role_of(" operator ") == "operator"
    assert role_of("viewer") == "viewer"
    for extra in (None, "", "admin", "Operator", "operator,viewer"):
        assert role_of(extra) == "viewer"


HOST = "console.example:8080"


@pytest.mark.parametrize(("headers", "allowed"), [
    ({"origin": "http://console.example:8080"}, True),
    ({"origin": "HTTP://Console.Example:8080"}, True),
    ({"origin": "http://console.example:8080", "sec-fetch-site": "same-origin"}, True),
    ({"referer": "http://console.example:8080/failed?x=1"}, True),
    ({}, False),
    ({"origin": "null"}, False),
    ({"origin": "http://console.example:8081"}, False),
    ({"origin": "https://console.example:8080"}, False),
    ({"origin": "http://evil.example"}, False),
    ({"referer": "http://evil.example/console.example:8080"}, False),
    ({"origin": "http://console.example:8080", "sec-fetch-site": "cross-site"}, False),
    ({"origin": "http://console.example:8080", "sec-fetch-site": "same-site"}, False),
    # Origin decides when both are there: a forged Referer does not help
    ({"origin": "http://evil.example", "referer": "http://console.example:8080/"}, False),
])
def test_same_origin(headers: dict[str, str], allowed: bool) -> None:
    assert same_origin(headers, "http", HOST) is allowed


def test_tokens_are_per_user_and_per_start() -> None:
    tokens = CsrfTokens(b"k" * 32)
    assert tokens.valid("olga", tokens.token("olga"))
    assert not tokens.valid("vic", tokens.token("olga"))
    assert not tokens.valid("olga", None) and not tokens.valid("olga", "")
    assert not CsrfTokens().valid("olga", tokens.token("olga"))


def minutes(*values: tuple[int, int, int]) -> list[MinuteOutcomes]:
    start = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    return [MinuteOutcomes(start + timedelta(minutes=n), *value)
            for n, value in enumerate(values)]


def test_chart_scales_to_the_busiest_minute_and_stacks() -> None:
    drawn = chart(minutes((10, 0, 0), (0, 0, 0), (5, 4, 1)), width=300, height=100)
    assert drawn.peak == 10
    assert drawn.totals == {"sent": 15, "failed": 4, "expired": 1}
    assert (drawn.first, drawn.last) == ("10:00", "10:02")
    first, empty, mixed = drawn.bars
    assert first.segments == (("sent", 0.0, 100.0),)
    assert empty.segments == ()
    assert [kind for kind, _, _ in mixed.segments] == ["sent", "failed", "expired"]
    tops = [y + height for _, y, height in mixed.segments]
    assert tops[0] == 100.0 and tops[1] == mixed.segments[0][1]  # stacked without gaps
    assert mixed.segments[-1][1] == pytest.approx(0.0)
    assert first.x < empty.x < mixed.x and first.width > 0
    assert mixed.label == "10:02: 5 sent, 4 failed, 1 expired"


def test_chart_keeps_one_row_visible_beside_thousands() -> None:
    drawn = chart(minutes((100_000, 1, 0)), height=100)
    assert drawn.bars[0].segments[1][2] == 1.0


def test_chart_of_nothing() -> None:
    drawn = chart([], width=100, height=50)
    assert drawn.bars == () and drawn.peak == 0 and drawn.first == ""


def test_parse_filter() -> None:
    assert parse_filter({}) == FailedFilter()
    assert parse_filter({"command": "send-sms", "route": " sms ", "older_than": "1h",
                         "newer_than": "7d", "reason": "1101"}) == FailedFilter(
        command="send-sms", route="sms", older_than=3600.0, newer_than=7 * 86400.0,
        reason="1101")
    with pytest.raises(BadRequest, match="command 'fly'"):
        parse_filter({"command": "fly"})
    with pytest.raises(BadRequest, match="older than"):
        parse_filter({"older_than": "yesterday"})
    with pytest.raises(BadRequest, match="reason is longer"):
        parse_filter({"reason": "x" * 201})


def test_filter_query_keeps_only_what_is_set() -> None:
    assert filter_query({"command": "send-sms", "route": "", "reason": "a b",
                         "done": "3"}) == "command=send-sms&reason=a+b"


def test_filter_record_and_description() -> None:
    where = FailedFilter(command="send-sms", older_than=7200.0,
                         reason="refused +4915112345678")
    record = filter_record(where)
    assert record == {"command": "send-sms", "older_than": 7200.0, "reason": "refused ***78"}
    assert describe_filter(record) == ("command send-sms, older than 2h, "
                                       "reason contains refused ***78")
    assert describe_filter({}) == "every failed row"
    assert describe_filter(filter_record(FailedFilter(ids=tuple(range(1, 13))))) == \
        "id 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 2 more"


@pytest.mark.parametrize(("seconds", "shown"), [
    (None, "—"), (0.25, "0.2s"), (12, "12s"), (60, "1m"), (125, "2m 5s"), (3600, "1h"),
    (3 * 3600 + 120, "3h 2m"), (86400 * 2 + 3600, "2d 1h"), (-5, "0.0s")])
def test_format_age(seconds: float | None, shown: str) -> None:
    assert format_age(seconds) == shown


def test_the_member_that_delivered_last_serves_the_pool() -> None:
    at = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    states = pool_states(["a|b|c", "x|y"], [("a", 40, at), ("b", 3, at + timedelta(seconds=5)),
                                           ("z", 9, at + timedelta(minutes=1))], 300.0)
    first, second = states
    assert (first.pool, first.members, first.serving) == ("a|b|c", ("a", "b", "c"), "b")
    assert first.recent == {"a": 40, "b": 3, "c": 0}
    assert first.last_sent_at == at + timedelta(seconds=5)
    assert (second.serving, second.recent, second.last_sent_at) == (None, {"x": 0, "y": 0},
                                                                    None)

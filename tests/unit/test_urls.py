"""outbox.urls: strict parsing of URLs with credentials, masking that hides exactly them."""

from __future__ import annotations

from urllib.parse import quote, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox.urls import UrlError, mask_url, parse_url

SECRET = "Lk9{}Qz7"


@pytest.mark.parametrize("char", list("#/?@%"))
@pytest.mark.parametrize("template", [
    "amqp://relay:{}@rabbit:5672/%2F?topic=sms",
    "postgresql://app:{}@db.example:5432/app",
    "redis://:{}@cache:6379/0?topic=sms",
    "http://otp:{}@otp-pi.local:8899/api/otp",
])
def test_a_raw_reserved_character_in_a_password_is_refused_without_quoting(
        template: str, char: str) -> None:
    password = SECRET.format(char)
    with pytest.raises(UrlError) as refused:
        parse_url(template.format(password))
    message = str(refused.value)
    assert "Lk9" not in message and "Qz7" not in message
    assert "percent" in message
    assert "Lk9" not in mask_url(template.format(password))


def test_a_raw_colon_in_the_password_belongs_to_the_password() -> None:
    parsed = parse_url("mqtt://relay:pa:ss@broker:1883?topic=sms")
    assert (parsed.username, parsed.password, parsed.host, parsed.port) == \
        ("relay", "pa:ss", "broker", 1883)
    assert mask_url("mqtt://relay:pa:ss@broker:1883?topic=sms") == \
        "mqtt://relay:***@broker:1883?topic=sms"


def test_a_port_that_is_not_a_number_is_refused_without_quoting_it() -> None:
    with pytest.raises(UrlError, match="port") as refused:
        parse_url("amqp://relay:Lk9Qz7/host")  # the '@' forgotten: the password is the port
    assert "Lk9" not in str(refused.value)


@pytest.mark.parametrize(("url", "host", "port"), [
    ("http://[::1]:8899/api", "[::1]", 8899),
    ("ws://otp@[fe80::1]/ws?topic=a", "[fe80::1]", None),
    ("stdout://", "", None),
    ("postgresql://app@/app?host=/run/postgresql", "", None),
])
def test_hosts_and_ports(url: str, host: str, port: int | None) -> None:
    parsed = parse_url(url)
    assert (parsed.host, parsed.port) == (host, port)


def test_secret_query_values_and_fragments_are_masked() -> None:
    assert mask_url("http://h/api?api_key=abc&topic=sms#frag") == "http://h/api?api_key=***&topic=sms#***"
    assert mask_url("stdout://") == "stdout://"
    assert mask_url("not a url") == "(hidden)"
    assert mask_url("amqp://u:a#b@h/") == "amqp://(hidden: not a valid URL)"


@given(st.text(min_size=1, max_size=30), st.text(max_size=10))
def test_any_percent_encoded_password_parses_back_and_is_masked(password: str, user: str) -> None:
    url = f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@rabbit:5672/%2F?topic=sms"
    parsed = parse_url(url)
    assert (parsed.username, parsed.password) == (user, password)
    # urllib (what the transport libraries use) reads the same credentials
    split = urlsplit(url)
    assert (split.hostname, split.port) == ("rabbit", 5672)
    masked = mask_url(url)
    assert masked == f"amqp://{quote(user, safe='')}:***@rabbit:5672/%2F?topic=sms"

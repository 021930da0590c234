"""URLs with credentials: parsed strictly, printed masked. The one owner of URL parsing.

Transport URLs and ``DATABASE_URL`` carry passwords, and a password may hold any character.
``urllib.parse`` is lenient: a raw ``#``, ``/`` or ``?`` in a password ends the authority
early, so the rest of the password lands in the path, the query or the fragment, where
masking cannot know it is a secret, and a library's error ("port could not be cast to
integer value as 'pa'") then quotes it. libpq stops a user name at the first ``@``, so a raw
``@`` in a password sends it to the host name. Rather than guess which ``@`` the user meant,
:func:`parse_url` refuses such a URL with a message that names the problem and says how to
percent-encode, never quoting any part of it. A URL it accepts means the same thing to
urllib, libpq and every transport library, so what :func:`mask_url` hides is exactly the
password.

Percent-encoding in the user and password: ``#`` %23, ``/`` %2F, ``?`` %3F, ``@`` %40,
``:`` %3A, ``%`` %25 (a space %20). ``urllib.parse.quote(password, safe="")`` does it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from outbox.errors import ConfigurationError

#: a setting or URL query key containing one of these holds a secret ...
_SECRET_WORDS = ("secret", "pass", "token", "auth", "credential", "signature")
#: ... and so do these (but not ``routing_key`` or ``key_id``)
_SECRET_NAMES = frozenset({"key", "apikey", "api_key", "api-key", "access_key", "private_key"})

ENCODING_HINT = ("percent-encode the user name and password: # as %23, / as %2F, ? as %3F, "
                 "@ as %40, : as %3A, % as %25")

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class UrlError(ValueError):
    """A URL refused; the message never quotes any part of the URL."""


def is_secret_name(name: str) -> bool:
    """Whether a setting or query key names a secret (``password``, ``api_key``, ``token``...)."""
    lowered = name.lower()
    return lowered in _SECRET_NAMES or any(word in lowered for word in _SECRET_WORDS)


@dataclass(frozen=True, slots=True)
class ParsedUrl:
    """The parts of an accepted URL; user and password percent-decoded."""

    scheme: str
    username: str | None
    password: str | None
    #: the host as written (an IPv6 address keeps its brackets), may be empty
    host: str
    port: int | None
    path: str
    query: str
    fragment: str

    @property
    def hostname(self) -> str:
        return self.host[1:-1] if self.host.startswith("[") else self.host


def parse_url(url: str) -> ParsedUrl:
    """Split ``url`` strictly; :class:`UrlError` (naming the problem, quoting nothing) if the
    user name or password holds a character that must be percent-encoded, or the port is not
    a number."""
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        raise UrlError("not a URL (expected scheme://host..., e.g. amqp://user:password@host)")
    end = len(rest)
    for stop in "/?#":
        found = rest.find(stop)
        if found != -1:
            end = min(end, found)
    authority, after = rest[:end], rest[end:]
    if "@" in after and "@" not in authority:
        raise UrlError("the URL has an '@' after its host: a user name or password holding '#', '/' or "
                       f"'?' must be percent-encoded ({ENCODING_HINT}); an '@' in the path or "
                       "query is written %40")
    userinfo, at, hostport = authority.rpartition("@")
    username = password = None
    if at:
        if "@" in userinfo:
            raise UrlError(f"the URL holds a raw '@' in its user name or password ({ENCODING_HINT})")
        if "@" in after:
            raise UrlError("the URL has an '@' after its host: a user name or password holding '#', "
                           f"'/' or '?' must be percent-encoded ({ENCODING_HINT})")
        if _BAD_ESCAPE.search(userinfo):
            raise UrlError(f"the URL holds a '%' that starts no percent-escape in its user name or "
                           f"password ({ENCODING_HINT})")
        raw_user, colon, raw_password = userinfo.partition(":")
        username = unquote(raw_user)
        password = unquote(raw_password) if colon else None
    host, port = _split_port(hostport)
    path, _, fragment = after.partition("#")
    path, _, query = path.partition("?")
    return ParsedUrl(scheme=scheme.lower(), username=username, password=password, host=host,
                     port=port, path=path, query=query, fragment=fragment)


def _split_port(hostport: str) -> tuple[str, int | None]:
    if hostport.startswith("["):
        close = hostport.find("]")
        if close == -1:
            raise UrlError("the URL has an IPv6 host without its closing ']'")
        host, rest = hostport[: close + 1], hostport[close + 1:]
        if rest and not rest.startswith(":"):
            raise UrlError("the URL has characters after its IPv6 host")
        digits = rest[1:] if rest else ""
    else:
        host, colon, digits = hostport.rpartition(":")
        if not colon:
            return hostport, None
        if ":" in host:
            raise UrlError("the URL has a host with several ':' (an IPv6 address goes in [brackets]; "
                           f"a password holding ':' must be percent-encoded: {ENCODING_HINT})")
    if digits == "":
        return host, None
    if not digits.isascii() or not digits.isdigit() or int(digits) > 65535:
        # Not quoted: with a raw character in a password, this "port" is part of it.
        raise UrlError(f"the URL has a port that is not a number from 0 to 65535 (if the URL holds a "
                       f"password, {ENCODING_HINT})")
    return host, int(digits)


def check_url(url: str, what: str) -> ParsedUrl:
    """:func:`parse_url` with ``what`` (``"transport 'sms'"``, ``"DATABASE_URL"``) in front of
    the problem, as a ``ConfigurationError``."""
    try:
        return parse_url(url)
    except UrlError as exc:
        raise ConfigurationError(f"{what}: {exc}") from None


def mask_url(url: str) -> str:
    """The URL with its password (and secret query values) replaced by ``***``.

    Never raises: a URL :func:`parse_url` refuses shows as its scheme alone, since any part
    of it may hold a piece of the password."""
    try:
        parts = parse_url(url)
    except UrlError:
        scheme = url.partition("://")[0] if "://" in url else ""
        return f"{scheme}://(hidden: not a valid URL)" if _SCHEME.fullmatch(scheme) else "(hidden)"
    netloc = parts.host if parts.port is None else f"{parts.host}:{parts.port}"
    if parts.username is not None:
        user = quote(parts.username, safe="")
        netloc = f"{user}:***@{netloc}" if parts.password is not None else f"{user}@{netloc}"
    query = "&".join(
        f"{key}=***" if is_secret_name(unquote(key)) else f"{key}={value}" if value else key
        for key, _, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    masked = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        masked += f"?{query}"
    if parts.fragment:
        masked += "#***"
    return masked


__all__ = ["ENCODING_HINT", "ParsedUrl", "UrlError", "check_url", "is_secret_name", "mask_url",
           "parse_url"]

"""OTP secrets: what is accepted, a fresh one, and the public id of each.

A managed OTP is only as strong as the secret its HMACs are keyed with: whoever holds a
database dump and has received one OTP (their own) knows a code, its reference and receiver,
and can test guesses of the secret against the stored digest, offline, as fast as HMAC-SHA-256
runs. So the secret must be random, **at least 128 bits**, written as

* hex: 32 or more hex digits (``outbox otp new-secret`` prints 32 random bytes, 64 digits), or
* base64 (standard or URL-safe, padding optional): 22 or more characters.

Anything else (a pass phrase, ``0000000000000000``) is refused at start, naming the problem
without quoting the secret. Randomness cannot be proven; what is refused beyond the length is
what no random source produces: too few distinct bytes (a repeated pattern). With 128 random
bits, testing a guess costs one HMAC against 2^128 candidates: no stored value (the key id,
the digests) lets a dump do better than that.

The HMAC key is the secret exactly as written (its UTF-8 text): a secret accepted before this
check existed keeps its key id and its stored digests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets

from outbox.errors import ConfigurationError

MIN_SECRET_BITS = 128
#: random bytes in a secret made by ``outbox otp new-secret``
NEW_SECRET_BYTES = 32

_HEX = re.compile(r"[0-9A-Fa-f]+")
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")


def new_secret() -> str:
    """A fresh secret: 32 random bytes as 64 hex digits."""
    return secrets.token_hex(NEW_SECRET_BYTES)


def secret_bytes(secret: str) -> bytes:
    """The random bytes a secret writes (hex or base64); ValueError naming the form if not."""
    text = secret.strip()
    if _HEX.fullmatch(text) and len(text) % 2 == 0:
        return bytes.fromhex(text)
    if _BASE64.fullmatch(text):
        body = text.rstrip("=").replace("-", "+").replace("_", "/")
        try:
            return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        except (binascii.Error, ValueError):
            pass
    raise ValueError("is not random bytes written as hex or base64 "
                     "(`outbox otp new-secret` prints one)")


def _distinct_enough(raw: bytes) -> bool:
    """False for byte strings no random source produces: a repeated pattern. For n random
    bytes the expected number of distinct values is 256·(1-(255/256)^n); at 16 bytes about
    15.5, and fewer than 10 happens about once in a million draws. The bound scales with n."""
    expected = 256 * (1 - (255 / 256) ** len(raw))
    return len(set(raw)) >= 0.6 * expected


def check_secret(secret: str | bytes, what: str = "OUTBOX_OTP_SECRET") -> bytes:
    """The HMAC key of ``secret`` once it is known to carry at least 128 random bits;
    ``ConfigurationError`` (never quoting it) otherwise."""
    if isinstance(secret, bytes | bytearray):
        raw = key = bytes(secret)
    else:
        key = secret.encode("utf-8")
        try:
            raw = secret_bytes(secret)
        except ValueError as exc:
            raise ConfigurationError(f"{what} {exc}; it needs at least {MIN_SECRET_BITS} random "
                                     "bits: 32 hex digits or 22 base64 characters") from None
    if len(raw) * 8 < MIN_SECRET_BITS:
        raise ConfigurationError(
            f"{what} carries {len(raw) * 8} bits; at least {MIN_SECRET_BITS} are needed "
            "(32 hex digits or 22 base64 characters; `outbox otp new-secret` prints one)")
    if not _distinct_enough(raw):
        raise ConfigurationError(
            f"{what} is a repeated pattern, not random bytes (`outbox otp new-secret` "
            "prints one)")
    return key


def key_id(key: bytes) -> str:
    """The public name of a key, stored with every OTP it hashed (to pick the key of a
    rotation). HMAC-SHA-256 of a label under the key: testing a guess of the key against it
    costs what testing it against a digest costs, one HMAC among 2^128 candidates."""
    return hmac.new(key, b"outbox-otp/key-id", hashlib.sha256).hexdigest()[:16]


__all__ = ["MIN_SECRET_BITS", "NEW_SECRET_BYTES", "check_secret", "key_id", "new_secret",
           "secret_bytes"]

"""Password hashes and users files for the network services outbox ships.

A users file holds one ``user:hash`` line per user, where ``hash`` is an argon2id hash as
:func:`hash_password` writes it. An optional third ``:``-separated field is an opaque string
that the service reading the file interprets (the console reads roles from it, ws-relay topic
rights); it runs to the end of the line and may itself hold ``:``. Blank lines and lines
starting with ``#`` are kept as they are and otherwise ignored::

    # outbox gateway users
    shop:$argon2id$v=19$m=65536,t=3,p=4$...$...
    ops:$argon2id$v=19$m=65536,t=3,p=4$...$...:operator

:func:`set_user` adds or replaces one line atomically (a new file renamed over the old one,
mode 0600), so a service that reloads the file never reads half of it.

argon2 costs tens of milliseconds per check, on purpose. :class:`UsersFile` keeps the
successful checks of the last ``ttl`` seconds in memory, keyed by an HMAC of user and password
under a key drawn at random per process, so a client sending the same credentials on every
request pays the hash once; a failed check is never remembered and always pays the full cost,
and an unknown user is checked against a dummy hash so that it costs what a wrong password
costs. The cache is dropped whenever the file changes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from outbox.errors import ConfigurationError

#: argon2-cffi's defaults are RFC 9106's second recommended profile (argon2id, 64 MiB, t=3).
_HASHER = PasswordHasher()

#: how long a successful check is remembered
DEFAULT_CACHE_TTL = 300.0
#: successful checks remembered at most (distinct user/password pairs that verified)
DEFAULT_CACHE_SIZE = 10_000


def hash_password(password: str, hasher: PasswordHasher | None = None) -> str:
    """The argon2id hash of ``password``, salted, in the PHC string format."""
    if not password:
        raise ValueError("empty password")
    return (hasher or _HASHER).hash(password)


def verify(password_hash: str, password: str, hasher: PasswordHasher | None = None) -> bool:
    """Whether ``password`` matches ``password_hash`` (constant time, as argon2 compares)."""
    try:
        return (hasher or _HASHER).verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def read_password(stream: IO[str]) -> str:
    """The password on the first line of ``stream`` (stdin: never the command line).

    Only the line end is removed; a password may begin or end with spaces.
    """
    line = stream.readline()
    password = line.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ConfigurationError("no password on standard input")
    return password


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    #: the optional third field, interpreted by the service (roles, topic rights)
    extra: str | None = None


def check_user_name(name: str) -> None:
    if not name or ":" in name or any(ch.isspace() for ch in name) or name.startswith("#"):
        raise ConfigurationError(
            f"user name {name!r} must be non-empty and hold no ':', no white space and not start with '#'"
        )


def parse_users(lines: Iterable[str], source: str = "users file") -> dict[str, User]:
    """The users of a users file; a malformed line is refused, naming its number (not its hash)."""
    users: dict[str, User] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(":", 2)
        if len(parts) < 2:
            raise ConfigurationError(f"{source}, line {number}: expected user:hash")
        name, password_hash = parts[0], parts[1]
        check_user_name(name)
        if not password_hash.startswith("$argon2"):
            raise ConfigurationError(f"{source}, line {number}: the hash of {name!r} is not an argon2 hash")
        if name in users:
            raise ConfigurationError(f"{source}, line {number}: user {name!r} appears twice")
        users[name] = User(name, password_hash, parts[2] if len(parts) == 3 else None)
    return users


def load_users(path: str | os.PathLike[str]) -> dict[str, User]:
    try:
        with open(path, encoding="utf-8") as handle:
            return parse_users(handle, source=str(path))
    except OSError as exc:
        raise ConfigurationError(f"cannot read users file {str(path)!r}: {exc.strerror}") from exc


def set_user(
    path: str | os.PathLike[str], user: str, password: str, extra: str | None = None
) -> None:
    """Add ``user`` to the users file at ``path``, or replace its line; other lines are kept.

    The new file is written beside the old one with mode 0600 and renamed over it, so readers
    see either the old file or the new one.
    """
    check_user_name(user)
    if extra is not None and ("\n" in extra or "\r" in extra):
        raise ConfigurationError("the extra field of a user cannot hold a line break")
    target = Path(path)
    line = f"{user}:{hash_password(password)}" + ("" if extra is None else f":{extra}")
    try:
        old_lines = target.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        old_lines = []
    except OSError as exc:
        raise ConfigurationError(f"cannot read users file {str(target)!r}: {exc.strerror}") from exc
    parse_users(old_lines, source=str(target))  # refuse to rewrite a file we cannot read back
    new_lines: list[str] = []
    replaced = False
    for old in old_lines:
        if old.split(":", 1)[0] == user:
            if not replaced:
                new_lines.append(line)
            replaced = True
        else:
            new_lines.append(old)
    if not replaced:
        new_lines.append(line)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write("\n".join(new_lines) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _file_identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    # A rename gives a new inode, so an atomic rewrite shows even within one mtime tick.
    return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)


class UsersFile:
    """The users of a file, reloaded when it changes, with cached successful checks.

    Thread-safe: the gateway checks passwords in worker threads so that argon2 does not hold
    up the event loop.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ttl: float = DEFAULT_CACHE_TTL,
        cache_size: int = DEFAULT_CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
        hasher: PasswordHasher | None = None,
    ) -> None:
        self.path = Path(path)
        self._ttl = ttl
        self._cache_size = cache_size
        self._clock = clock
        self._hasher = hasher or _HASHER
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._cache: dict[bytes, tuple[User, float]] = {}
        # Same parameters as real hashes, so an unknown user costs what a wrong password costs.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        self._identity: tuple[int, int, int, int] | None = None
        self._users: dict[str, User] = {}
        self.reload()

    @property
    def users(self) -> dict[str, User]:
        self._reload_if_changed()
        return dict(self._users)

    def reload(self) -> None:
        """Read the file again (a missing or malformed file raises ConfigurationError)."""
        with self._lock:
            identity = _file_identity(self.path)
            users = load_users(self.path)
            self._users = users
            self._identity = identity
            self._cache.clear()

    def _reload_if_changed(self) -> None:
        if _file_identity(self.path) != self._identity:
            try:
                self.reload()
            except ConfigurationError:
                # A file being replaced by hand may be broken for a moment: keep the users we
                # have rather than lock everyone out, and forget the cached checks.
                with self._lock:
                    self._cache.clear()

    def _digest(self, user: str, password: str) -> bytes:
        message = user.encode("utf-8") + b"\x00" + password.encode("utf-8")
        return hmac.digest(self._key, message, hashlib.sha256)

    def cached(self, user: str, password: str) -> User | None:
        """The user when these credentials passed a full check within the TTL, else None
        (which means "not known yet", not "wrong": :meth:`authenticate` decides that).

        Cheap enough for an event loop; :meth:`authenticate` belongs in a worker thread.
        """
        self._reload_if_changed()
        digest = self._digest(user, password)
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None and hit[1] > self._clock():
            return hit[0]
        return None

    def authenticate(self, user: str, password: str) -> User | None:
        """The user if ``password`` is theirs, else None; unknown users cost a full check too."""
        self._reload_if_changed()
        digest = self._digest(user, password)
        now = self._clock()
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None and hit[1] > now:
                return hit[0]
            known = self._users.get(user)
        if known is None:
            verify(self._dummy_hash, password, self._hasher)
            return None
        if not verify(known.password_hash, password, self._hasher):
            return None
        if self._ttl <= 0:
            return known
        with self._lock:
            if self._users.get(user) is known:  # not reloaded with another hash meanwhile
                if len(self._cache) >= self._cache_size:
                    self._evict(now)
                self._cache[digest] = (known, now + self._ttl)
        return known

    def _evict(self, now: float) -> None:
        expired = [key for key, (_, until) in self._cache.items() if until <= now]
        for key in expired:
            del self._cache[key]
        if len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)))


__all__ = [
    "User",
    "UsersFile",
    "check_user_name",
    "hash_password",
    "load_users",
    "parse_users",
    "read_password",
    "set_user",
    "verify",
]

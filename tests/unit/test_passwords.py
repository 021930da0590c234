from __future__ import annotations

import io
import os
import stat
import threading
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from outbox import passwords
from outbox.errors import ConfigurationError
from outbox.passwords import (
    User,
    UsersFile,
    hash_password,
    parse_users,
    read_password,
    set_user,
    verify,
)

# Cheap parameters for the cache tests: the logic is the same, the cost is not the point there.
CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


class CountingHasher(PasswordHasher):
    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.verifications: list[str] = []

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verifications.append(hash if isinstance(hash, str) else hash.decode())
        return super().verify(hash, password)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write_users(path: Path, *lines: str) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_hash_is_argon2id_salted_and_verifies() -> None:
    first = hash_password("s3cret pass")
    second = hash_password("s3cret pass")
    assert first.startswith("$argon2id$")
    assert first != second
    assert verify(first, "s3cret pass")
    assert not verify(first, "s3cret pas")
    assert not verify("$argon2id$garbage", "s3cret pass")
    with pytest.raises(ValueError, match="empty"):
        hash_password("")


def test_parse_users_reads_hash_and_opaque_extra_field() -> None:
    h = CHEAP.hash("x")
    users = parse_users([
        "# comment",
        "",
        f"shop:{h}",
        f"ops:{h}:operator",
        f"relay:{h}:sms:read,otp:write",
    ])
    assert users["shop"] == User("shop", h, None)
    assert users["ops"].extra == "operator"
    assert users["relay"].extra == "sms:read,otp:write"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("nohash", "expected user:hash"),
        ("shop:plaintext", "not an argon2 hash"),
        (":$argon2id$x", "user name"),
    ],
)
def test_parse_users_refuses_malformed_lines_naming_the_line(line: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem) as caught:
        parse_users(["# first", line], source="users")
    if "user name" not in problem:
        assert "line 2" in str(caught.value)
    assert "plaintext" not in str(caught.value)


def test_parse_users_refuses_a_user_twice() -> None:
    h = CHEAP.hash("x")
    with pytest.raises(ConfigurationError, match="twice"):
        parse_users([f"a:{h}", f"a:{h}"])


def test_set_user_adds_replaces_keeps_others_and_is_0600(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_user(path, "shop", "first")
    set_user(path, "ops", "second", extra="operator")
    path.write_text("# keep me\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
    set_user(path, "shop", "third")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == "# keep me"
    assert [line.split(":", 1)[0] for line in lines[1:]] == ["shop", "ops"]
    users = passwords.load_users(path)
    assert verify(users["shop"].password_hash, "third")
    assert not verify(users["shop"].password_hash, "first")
    assert users["ops"].extra == "operator"
    assert verify(users["ops"].password_hash, "second")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "third" not in text and "second" not in text
    assert [p.name for p in tmp_path.iterdir()] == ["users"]  # no temporary left behind


def test_set_user_refuses_bad_names_and_unreadable_files(tmp_path: Path) -> None:
    path = tmp_path / "users"
    for name in ("", "a:b", "a b", "#x"):
        with pytest.raises(ConfigurationError, match="user name"):
            set_user(path, name, "pw")
    with pytest.raises(ConfigurationError, match="line break"):
        set_user(path, "a", "pw", extra="x\ny")
    path.write_text("garbage\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="line 1"):
        set_user(path, "a", "pw")
    assert path.read_text(encoding="utf-8") == "garbage\n"


def test_read_password_takes_the_first_line_only() -> None:
    assert read_password(io.StringIO(" pass word \nsecond\n")) == " pass word "
    assert read_password(io.StringIO("crlf\r\n")) == "crlf"
    with pytest.raises(ConfigurationError, match="no password"):
        read_password(io.StringIO(""))
    with pytest.raises(ConfigurationError, match="no password"):
        read_password(io.StringIO("\n"))


def test_authenticate_caches_successes_only(tmp_path: Path) -> None:
    hasher = CountingHasher()
    path = tmp_path / "users"
    write_users(path, f"shop:{hasher.hash('right')}:extra")
    users = UsersFile(path, hasher=hasher, clock=FakeClock())
    hasher.verifications.clear()

    user = users.authenticate("shop", "right")
    assert user is not None and user.name == "shop" and user.extra == "extra"
    assert users.authenticate("shop", "right") == user
    assert len(hasher.verifications) == 1  # the second success came from the cache

    assert users.authenticate("shop", "wrong") is None
    assert users.authenticate("shop", "wrong") is None
    assert len(hasher.verifications) == 3  # every failure pays


def test_unknown_user_costs_a_full_check_against_the_dummy_hash(tmp_path: Path) -> None:
    hasher = CountingHasher()
    path = tmp_path / "users"
    real = hasher.hash("right")
    write_users(path, f"shop:{real}")
    users = UsersFile(path, hasher=hasher)
    hasher.verifications.clear()
    assert users.authenticate("nobody", "right") is None
    assert users.authenticate("nobody", "right") is None
    assert len(hasher.verifications) == 2
    assert all(h != real and h.startswith("$argon2id$") for h in hasher.verifications)


def test_cache_expires_after_ttl(tmp_path: Path) -> None:
    hasher = CountingHasher()
    clock = FakeClock()
    path = tmp_path / "users"
    write_users(path, f"shop:{hasher.hash('right')}")
    users = UsersFile(path, hasher=hasher, clock=clock, ttl=60)
    hasher.verifications.clear()
    assert users.authenticate("shop", "right")
    clock.now += 59
    assert users.authenticate("shop", "right")
    assert len(hasher.verifications) == 1
    clock.now += 2
    assert users.authenticate("shop", "right")
    assert len(hasher.verifications) == 2


def test_a_changed_file_drops_the_cache_and_old_passwords(tmp_path: Path) -> None:
    hasher = CountingHasher()
    path = tmp_path / "users"
    write_users(path, f"shop:{hasher.hash('old')}", f"other:{hasher.hash('x')}")
    users = UsersFile(path, hasher=hasher)
    assert users.authenticate("shop", "old")
    # Rewritten the way set_user does it: a new file renamed over the old one.
    replacement = tmp_path / "users.new"
    write_users(replacement, f"shop:{hasher.hash('new')}")
    replacement.replace(path)
    assert users.authenticate("shop", "old") is None
    assert users.authenticate("shop", "new") is not None
    assert users.authenticate("other", "x") is None
    assert set(users.users) == {"shop"}


def test_a_broken_rewrite_keeps_the_users_but_drops_the_cache(tmp_path: Path) -> None:
    hasher = CountingHasher()
    path = tmp_path / "users"
    write_users(path, f"shop:{hasher.hash('right')}")
    users = UsersFile(path, hasher=hasher)
    assert users.authenticate("shop", "right")
    hasher.verifications.clear()
    path.write_text("half a line", encoding="utf-8")
    assert users.authenticate("shop", "right") is not None
    assert len(hasher.verifications) == 1


def test_missing_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read users file"):
        UsersFile(tmp_path / "absent", hasher=CHEAP)


def test_cache_is_bounded(tmp_path: Path) -> None:
    hasher = CountingHasher()
    path = tmp_path / "users"
    write_users(path, *(f"u{i}:{hasher.hash('pw')}" for i in range(5)))
    users = UsersFile(path, hasher=hasher, cache_size=3)
    for i in range(5):
        assert users.authenticate(f"u{i}", "pw")
    assert len(users._cache) <= 3


def test_concurrent_checks_from_threads(tmp_path: Path) -> None:
    hasher = CountingHasher()
    path = tmp_path / "users"
    write_users(path, f"shop:{hasher.hash('right')}")
    users = UsersFile(path, hasher=hasher)
    results: list[bool] = []

    def check(password: str) -> None:
        results.append(users.authenticate("shop", password) is not None)

    threads = [threading.Thread(target=check, args=("right" if i % 2 else "wrong",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 4 + [True] * 4


def test_cached_answers_only_what_a_full_check_passed(tmp_path: Path) -> None:
    hasher = CountingHasher()
    clock = FakeClock()
    path = tmp_path / "users"
    write_users(path, f"shop:{hasher.hash('right')}")
    users = UsersFile(path, hasher=hasher, clock=clock, ttl=10)
    assert users.cached("shop", "right") is None
    assert users.authenticate("shop", "right") is not None
    assert users.cached("shop", "right") is not None
    assert users.cached("shop", "wrong") is None
    clock.now += 11
    assert users.cached("shop", "right") is None


def test_ttl_zero_disables_the_cache(tmp_path: Path) -> None:
    hasher = CountingHasher()
    path = tmp_path / "users"
    write_users(path, f"shop:{hasher.hash('right')}")
    users = UsersFile(path, hasher=hasher, ttl=0)
    hasher.verifications.clear()
    assert users.authenticate("shop", "right") is not None
    assert users.authenticate("shop", "right") is not None
    assert len(hasher.verifications) == 2
    assert users.cached("shop", "right") is None

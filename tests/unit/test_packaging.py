"""What a user installs: one version, MIT licence, pgserver only with [embedded], `make run`
without the dev tools, `make test` linting first, a container recipe from this tree."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import outbox

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()
            for requirement in requirements}


def test_the_version_is_written_once() -> None:
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["dynamic"]["version"] == {"attr": "outbox.__version__"}
    assert importlib.metadata.version("outbox-otp") == outbox.__version__


def test_pgserver_is_only_in_the_embedded_extra() -> None:
    assert "pgserver" not in _names(PROJECT["dependencies"])
    assert _names(PROJECT["optional-dependencies"]["embedded"]) == {"pgserver"}
    tools = _names(PROJECT["optional-dependencies"]["dev"])
    assert not tools & _names(PROJECT["dependencies"])


def test_mit_licence_file() -> None:
    assert PROJECT["license"] == "MIT" and PROJECT["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def _recipe(target: str) -> str:
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert match, target
    return match.group(0)


def test_make_run_installs_what_running_needs_and_make_test_lints_first() -> None:
    run = _recipe("run")
    assert "$(RUN_STAMP)" in run.splitlines()[0]
    assert "'.[embedded]'" in _recipe("$(RUN_STAMP)")
    test = _recipe("test").splitlines()
    commands = [line.strip() for line in test[1:]]
    assert commands.index("$(BIN)/ruff check outbox migrations tests bench") < \
        commands.index("$(BIN)/python -m pytest")
    assert commands.index("$(BIN)/mypy") < commands.index("$(BIN)/python -m pytest")


def test_the_container_recipe_builds_from_this_tree() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    [dockerfile] = re.findall(r"```dockerfile\n(.*?)```", operations, re.S)
    for copied in re.findall(r"^COPY (?!--from)(.*) \S+$", dockerfile, re.M):
        for name in copied.split():
            assert (ROOT / name).exists(), name  # it names only what exists
    installs = re.findall(r"pip install[^\n]*", dockerfile)
    assert installs and all("/wheels" in line for line in installs)  # nothing from an index

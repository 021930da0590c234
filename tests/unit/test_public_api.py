"""Keep ``__all__`` honest: everything it names exists, everything public is named."""

from __future__ import annotations

import importlib

import pytest

import outbox
import outbox.errors

MODULES = ["outbox", "outbox.commands", "outbox.errors", "outbox.retry", "outbox.store",
           "outbox.settings", "outbox.testing", "outbox.transports", "outbox.producer"]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    for attribute in module.__all__:
        assert hasattr(module, attribute), f"{name}.__all__ names missing {attribute}"


def test_every_error_is_exported_from_the_package() -> None:
    for attribute in dir(outbox.errors):
        value = getattr(outbox.errors, attribute)
        if isinstance(value, type) and issubclass(value, Exception) and \
                value.__module__ == "outbox.errors":
            assert attribute in outbox.__all__

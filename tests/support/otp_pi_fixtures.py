"""pytest fixtures for the OTP-Pi stand-in; a test module enables them with
``pytest_plugins = ("tests.support.otp_pi_fixtures",)``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.otp_pi import OtpPi


@pytest.fixture
def otp_pi_factory() -> Iterator[Callable[..., OtpPi]]:
    """Start devices with the given settings (``OtpPi`` fields); all stop after the test."""
    started: list[OtpPi] = []

    def start(**settings: Any) -> OtpPi:
        device = OtpPi(**settings).start()
        started.append(device)
        return device

    yield start
    for device in started:
        device.stop()


@pytest.fixture
def otp_pi(otp_pi_factory: Callable[..., OtpPi]) -> OtpPi:
    """A running device: user ``otp``, password ``pi-secret``, modem and mail working."""
    return otp_pi_factory()


__all__ = ["otp_pi", "otp_pi_factory"]

"""The HTTP faces of outbox, on Starlette served by uvicorn: ``outbox gateway`` (the OTP-Pi
REST API in front of the outbox, :mod:`outbox.web.gateway`) and ``outbox console`` (the
operator's console, :mod:`outbox.web.console`); :mod:`outbox.web.server` runs an app with the
options every service shares (workers, TLS, graceful SIGTERM)."""

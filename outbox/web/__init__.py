"""The HTTP faces of outbox, on Starlette served by uvicorn: ``outbox gateway`` (the OTP-Pi
REST API in front of the outbox, :mod:`outbox.web.gateway`); :mod:`outbox.web.server` runs
an app with the options every service shares (workers, TLS, graceful SIGTERM)."""

"""Routes: which transports a row goes to. ``+`` fans out, ``|`` makes a failover pool.

Pure functions on route strings, shared by the settings (which validate the configured
routes) and the transports (which open pools), so neither needs the other for them.
"""

from __future__ import annotations

from outbox.errors import ConfigurationError

FAN_OUT = "+"
POOL = "|"
ROUTE_OPERATORS = (FAN_OUT, POOL)


def route_names(route: str) -> tuple[str, ...]:
    """The targets of a route, each published once: ``"a"`` is one transport; ``"a+b"`` an
    explicit fan-out to both; ``"a|b|c"`` a failover pool (the first member that is up
    publishes the row); ``"a|b+c"`` a fan-out to the pool ``a|b`` and to ``c`` (``|`` binds
    tighter than ``+``). A pool comes back normalised (``"a|b"``, no spaces): that is its
    name in metrics and logs. A transport named twice in one route is refused: it would
    send the same person two copies, or make a pool fail over to itself."""
    targets: list[str] = []
    seen: set[str] = set()
    for part in route.split(FAN_OUT):
        members = [name.strip() for name in part.split(POOL) if name.strip()]
        for name in members:
            if name in seen:
                raise ConfigurationError(f"route {route!r} names {name!r} twice")
            seen.add(name)
        if members:
            targets.append(POOL.join(members))
    if not targets:
        raise ConfigurationError(f"empty route {route!r}")
    return tuple(targets)


def pool_members(target: str) -> tuple[str, ...]:
    """The transport names of one route target: one name, or a pool's members in order."""
    return tuple(target.split(POOL))


def is_pool(target: str) -> bool:
    return POOL in target


__all__ = ["FAN_OUT", "POOL", "ROUTE_OPERATORS", "is_pool", "pool_members", "route_names"]

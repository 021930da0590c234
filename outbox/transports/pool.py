"""A failover pool (route ``a|b|c``): one transport made of several, each row published once.

A batch goes to the first member that is up. A member is down when it fails a batch as a
whole with transient errors (refused, timed out, no modem: ``1101`` for every row) or when
its check fails; the same batch then goes on to the next member at once, in the same call.
A prober thread checks down members every ``pool_probe_interval`` (and idle up ones, so a
device that went away is noticed before traffic finds out): an earlier member that passes
is used again from the next batch on, without waiting for a failure of the later one. A
member whose check passes but whose batches keep failing (a device up without its modem)
is probed at doubling intervals, so it costs one failed batch now and then, not every one.

A member with a rate limit (``rate=`` on its URL) is only used for rows whose tokens the
claim took from its bucket: the claim asks :meth:`PoolTransport.serving_member`, takes that
member's tokens and publishes ``through`` it; a failover within the batch goes on only to
members without a rate. Rows left over are handed back (not tried) and the next claim takes
the next member's tokens: the device never sees more than its rate.

When every member is down the batch is not tried at all: each row gets
:class:`~outbox.errors.TransportDown`, keeps its attempt count and is due again after the
next probe. So an outage of the whole pool, however long, never makes a row ``failed``.

The decisions (which member, when a member is down, when to probe) are the pure functions
of :mod:`outbox.scheduling`; this class holds the state, the locks and the thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from outbox import metrics
from outbox.errors import PublishError, TransientPublishError, TransportDown
from outbox.logs import get_logger, scrub_text
from outbox.scheduling import (
    MemberState,
    ProbePolicy,
    batch_failed_as_a_whole,
    delivered,
    next_probe_at,
    probe_passed,
    probes_due,
    serving_order,
    went_down,
)
from outbox.transports.base import Envelope, Failures, Transport, TransportOptions

log = get_logger("outbox.pool")


class PoolFailures(dict[int, PublishError]):
    """A pool's answer: the failures, as any transport's, and the member that delivered the
    rest (every row delivered by one call went through the same member)."""

    served_by: str | None = None


class PoolTransport:
    """Publishes each batch through the first member that is up (see the module)."""

    def __init__(self, name: str, members: Sequence[Transport], *,
                 policy: ProbePolicy | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 probing: bool = True) -> None:
        if len(members) < 2:
            raise ValueError("a pool needs at least two members")
        self.name = name
        self.members = tuple(members)
        first = self.members[0].options
        # Members agree on dialect and OTP mode (checked with the settings): an envelope is
        # encoded once, before the member is chosen. The pool waits as long as its slowest.
        self.options: TransportOptions = replace(
            first, timeout=max(member.options.timeout for member in self.members),
            rate=None, extra={})
        self.policy = policy or ProbePolicy()
        self.clock = clock
        self._states = [MemberState(next_probe_at=clock() + self.policy.interval)
                        for _ in self.members]
        self._reasons: list[str] = ["" for _ in self.members]
        self._state_lock = threading.Lock()
        #: one caller at a time per member: the prober never checks a member mid-publish
        self._member_locks = [threading.Lock() for _ in self.members]
        self._stop = threading.Event()
        self._nudge = threading.Event()
        for member in self.members:
            metrics.POOL_MEMBER_UP.labels(name, member.name).set(1)
            metrics.POOL_DELIVERIES.labels(name, member.name)
        self._prober: threading.Thread | None = None
        if probing:
            self._prober = threading.Thread(target=self._probe_loop, name=f"outbox-pool-{name}",
                                            daemon=True)
            self._prober.start()

    # -- Transport -------------------------------------------------------------------------

    def publish(self, batch: Sequence[Envelope], *, through: str | None = None) -> Failures:
        """Publish through the first member up; ``through`` names the rate-limited member
        whose tokens the claim took (the only rate-limited member this call may use)."""
        if not batch:
            return {}
        with self._state_lock:
            order = serving_order(self._states)
        skipped = [index for index in order if self.members[index].options.rate is not None
                   and self.members[index].name != through]
        order = [index for index in order if index not in skipped]
        last_errors: Failures = {}
        for index in order:
            member = self.members[index]
            with self._member_locks[index]:
                failures = self._publish_on(member, batch)
            now = self.clock()
            if batch_failed_as_a_whole(len(batch), len(failures),
                                       all(error.transient for error in failures.values())):
                reason = str(next(iter(failures.values())))
                self._mark_down(index, now, reason)
                last_errors = failures
                continue  # the same rows, on to the next member
            served = len(batch) - len(failures)
            answer = PoolFailures(failures)
            if served:
                answer.served_by = member.name
                metrics.POOL_DELIVERIES.labels(self.name, member.name).inc(served)
                with self._state_lock:
                    self._states[index] = delivered(self._states[index], now, self.policy)
            return answer
        if skipped:
            # A member is up but has a rate: the next claim takes its tokens.
            error = TransportDown(
                f"{self.name}: handed back for {self.members[skipped[0]].name}'s tokens",
                retry_after=0.0)
        elif last_errors:
            # Tried, and every member up failed as a whole: ordinary transient failures.
            return last_errors
        else:
            error = TransportDown(f"{self.name}: every member is down ({self._summary()})",
                                  retry_after=self.retry_after())
        return {envelope.id: error for envelope in batch}

    def check(self) -> None:
        """Passes when at least one member's check passes (members are checked in order
        and their states updated, as a probe would)."""
        reasons: list[str] = []
        for index, member in enumerate(self.members):
            if self._probe(index, blocking=True):
                return
            reasons.append(f"{member.name}: {self._reasons[index]}")
        raise TransientPublishError(f"{self.name}: no member reachable ({'; '.join(reasons)})")

    def close(self) -> None:
        self._stop.set()
        self._nudge.set()
        if self._prober is not None and self._prober is not threading.current_thread():
            self._prober.join(5)
        for member in self.members:
            member.close()

    # -- state -----------------------------------------------------------------------------

    def serving_member(self) -> Transport | None:
        """The member the next batch goes to (None: every member is down)."""
        with self._state_lock:
            order = serving_order(self._states)
        return self.members[order[0]] if order else None

    def serving(self) -> str | None:
        member = self.serving_member()
        return None if member is None else member.name

    def member_states(self) -> dict[str, MemberState]:
        with self._state_lock:
            return {member.name: state for member, state in zip(self.members, self._states,
                                                                 strict=True)}

    def retry_after(self) -> float:
        """Seconds until the next probe may bring a member back (for rows not tried)."""
        with self._state_lock:
            due = next_probe_at([state for state in self._states if not state.up])
        if due is None:
            return self.policy.interval
        return max(due - self.clock(), 0.0) + 0.05

    def _summary(self) -> str:
        return "; ".join(f"{member.name}: {self._reasons[index] or 'down'}"
                         for index, member in enumerate(self.members))

    def _publish_on(self, member: Transport, batch: Sequence[Envelope]) -> Failures:
        try:
            return member.publish(batch)
        except PublishError as exc:
            return {envelope.id: exc for envelope in batch}
        except Exception as exc:  # a bug or an unmapped library error: that member is down
            log.exception("transport.unexpected_error", route=member.name,
                          error=type(exc).__name__)
            unexpected = TransientPublishError(
                f"unexpected {type(exc).__name__} in transport {member.name!r}")
            return {envelope.id: unexpected for envelope in batch}

    def _mark_down(self, index: int, now: float, reason: str) -> None:
        with self._state_lock:
            was_up = self._states[index].up
            self._states[index] = went_down(self._states[index], now, self.policy)
            self._reasons[index] = scrub_text(reason)[:300]
            flaps = self._states[index].flaps
        if was_up:
            metrics.POOL_MEMBER_UP.labels(self.name, self.members[index].name).set(0)
            log.warning("pool.member_down", pool=self.name, member=self.members[index].name,
                        reason=self._reasons[index], flaps=flaps,
                        next_probe_in=round(self.policy.delay(flaps), 3))
        self._nudge.set()

    # -- probing ---------------------------------------------------------------------------

    def _probe(self, index: int, *, blocking: bool) -> bool:
        """Check one member; True when it passed. A member busy publishing is not checked
        (its publish says how it is): the probe counts as passed if it is up."""
        lock = self._member_locks[index]
        if not lock.acquire(blocking=blocking):
            with self._state_lock:
                state = self._states[index]
                self._states[index] = replace(state,
                                              next_probe_at=self.clock() + self.policy.interval)
                return state.up
        try:
            self.members[index].check()
        except PublishError as exc:
            self._mark_down(index, self.clock(), str(exc) or type(exc).__name__)
            return False
        except Exception as exc:  # a bug in a member's check: down, and say so
            log.exception("transport.unexpected_error", route=self.members[index].name,
                          error=type(exc).__name__)
            self._mark_down(index, self.clock(), f"unexpected {type(exc).__name__}")
            return False
        finally:
            lock.release()
        with self._state_lock:
            was_up = self._states[index].up
            self._states[index] = probe_passed(self._states[index], self.clock(), self.policy)
        if not was_up:
            metrics.POOL_MEMBER_UP.labels(self.name, self.members[index].name).set(1)
            log.info("pool.member_up", pool=self.name, member=self.members[index].name)
        return True

    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            with self._state_lock:
                due = probes_due(self._states, self.clock())
                wake_at = next_probe_at(self._states)
            for index in due:
                if self._stop.is_set():
                    return
                try:
                    self._probe(index, blocking=False)
                except Exception:  # never let the prober die: the pool would stay down
                    log.exception("pool.probe_failed", pool=self.name,
                                  member=self.members[index].name)
            if due:
                continue
            timeout = self.policy.interval if wake_at is None else max(wake_at - self.clock(),
                                                                       0.01)
            self._nudge.wait(timeout)
            self._nudge.clear()


__all__ = ["PoolFailures", "PoolTransport"]

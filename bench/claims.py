"""Chaos scenarios for bounded claims (issue 10): a frozen relay, a relay cut off from
Postgres, and a device that takes seconds per SMS under the documented supervisors.

Each runs real ``outbox run`` processes against :mod:`bench.slowdevice`, which serves one
request at a time and records every message id it accepted, repeats included; what was
enqueued is read back from ``outbox.message``. Used by :mod:`bench.chaos`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    ROOT,
    ChildServer,
    RelayConfig,
    RelayProcess,
    connect,
    free_port,
    progress,
    reset,
    seed,
)
from bench.slowdevice import read_arrivals

#: the claim timeout the scenarios run with: short enough to watch it run out
CLAIM_TIMEOUT = 10.0
#: one worker per lane; a claim of a slow device is a few rows
SLOW = RelayConfig(batch_size=200, workers=1)


@dataclass
class Outcome:
    passed: bool
    summary: str
    details: dict[str, Any]


class SlowDevice(ChildServer):
    """:mod:`bench.slowdevice` on a free port."""

    def __init__(self, seconds: float, *, host: str = LOOPBACK) -> None:
        self.port = free_port()
        self.host = host
        handle, name = tempfile.mkstemp(prefix="outbox-slow-device-")
        os.close(handle)
        self.out = Path(name)
        super().__init__("bench.slowdevice", "--port", str(self.port), "--host", host,
                         "--seconds", str(seconds), "--out", name)

    def url(self, host: str | None = None, port: int | None = None) -> str:
        return f"http://otp:pi@{host or self.host}:{port or self.port}/api/sms"

    def instant(self) -> None:
        """The modem becomes instant: drain what is left quickly."""
        assert self.process is not None
        self.process.send_signal(signal.SIGUSR1)

    def arrivals(self) -> list[tuple[int, float]]:
        return read_arrivals(self.out)

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)


def relay_env(**extra: str) -> dict[str, str]:
    return {"OUTBOX_CLAIM_TIMEOUT": f"{CLAIM_TIMEOUT}s", "OUTBOX_POLL_INTERVAL": "0.5", **extra}


def claimed_by(url: str, pid: int) -> set[int]:
    with connect(url) as conn:
        return {row[0] for row in conn.execute(
            "SELECT id FROM outbox.message WHERE state = 'pending' AND claim IS NOT NULL "
            "AND split_part(claimed_by, ':', 2) = %s", (str(pid),))}


def sent_times(url: str, ids: set[int]) -> dict[int, float]:
    with connect(url) as conn:
        return {row[0]: row[1] for row in conn.execute(
            "SELECT id, extract(epoch FROM sent_at)::float8 FROM outbox.message "
            "WHERE state = 'sent' AND id = ANY(%s)", (list(ids),))}


def states(url: str) -> dict[str, int]:
    with connect(url) as conn:
        return dict(conn.execute("SELECT state, count(*) FROM outbox.message GROUP BY 1"))


def wait(condition: Callable[[], bool], timeout: float, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


def drain(url: str, device: SlowDevice, total: int, timeout: float = 300) -> bool:
    device.instant()
    return wait(lambda: states(url).get("sent", 0) == total, timeout, every=0.5)


def delivery(url: str, device: SlowDevice) -> dict[str, Any]:
    arrivals = [message_id for message_id, _ in device.arrivals()]
    counts = Counter(arrivals)
    with connect(url) as conn:
        enqueued = {row[0] for row in conn.execute("SELECT id FROM outbox.message")}
    return {"enqueued": len(enqueued), "received": len(counts),
            "lost": len(enqueued - set(counts)),
            "duplicates": sum(n - 1 for n in counts.values()), "states": states(url)}


# --- a frozen relay --------------------------------------------------------------------------


def frozen_relay(url: str, logs: Path, *, rows: int, freeze: float) -> Outcome:
    """Two relays share a backlog to a slow device; one is SIGSTOPped while it holds a claim."""
    reset(url)
    seed(url, rows)
    progress(f"frozen-relay: {rows} rows, a 0.1 s device, 2 relays, one frozen for {freeze:.0f}s "
             f"(claim timeout {CLAIM_TIMEOUT:.0f}s)")
    with SlowDevice(0.1) as device:
        assert isinstance(device, SlowDevice)
        a = RelayProcess(url, device.url(), SLOW, log=logs / "chaos-frozen-a.log", **relay_env())
        b = RelayProcess(url, device.url(), SLOW, log=logs / "chaos-frozen-b.log", **relay_env())
        a.start()
        try:
            # freeze it once it knows the device's pace and holds a claim of its own size
            wait(lambda: states(url).get("sent", 0) >= 5, 60, every=0.05)
            wait(lambda: len(claimed_by(url, a.pid)) > 1, 60, every=0.01)
            b.start()
            os.kill(a.pid, signal.SIGSTOP)
            frozen_at = time.time()
            held = claimed_by(url, a.pid)
            progress(f"frozen-relay: relay A frozen holding {len(held)} rows")
            taken = wait(lambda: not claimed_by(url, a.pid) & held, CLAIM_TIMEOUT + 30,
                         every=0.1)
            taken_after = time.time() - frozen_at
            wait(lambda: len(sent_times(url, held)) == len(held), CLAIM_TIMEOUT + 30, every=0.2)
            took = max(sent_times(url, held).values(), default=frozen_at) - frozen_at
            time.sleep(max(0.0, freeze - (time.time() - frozen_at)))
            os.kill(a.pid, signal.SIGCONT)
            drained = drain(url, device, rows)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(a.pid, signal.SIGCONT)
            codes = (a.stop(), b.stop())
        result = delivery(url, device)
    passed = (taken and drained and result["lost"] == 0 and took <= CLAIM_TIMEOUT + 5
              and result["duplicates"] <= len(held) and codes == (0, 0))
    summary = (f"held {len(held)} rows while frozen; the other relay took them over "
               f"{taken_after:.1f}s and had them all sent {took:.1f}s after the freeze (bound "
               f"{CLAIM_TIMEOUT:.0f}+5 s); "
               f"lost={result['lost']} duplicates={result['duplicates']} "
               f"(bound: one claim = {len(held)}) states={result['states']} exits={codes}")
    return Outcome(passed, summary, {"held": len(held), "taken_over_after_seconds": taken_after,
                                     "sent_after_seconds": took,
                                     "claim_timeout": CLAIM_TIMEOUT, **result})


# --- a relay cut off from Postgres -----------------------------------------------------------


class Namespace:
    """A network namespace joined to the host by a veth pair (a host of our own)."""

    def __init__(self, name: str = "outbox-chaos", host_ip: str = "10.211.7.1",
                 ns_ip: str = "10.211.7.2") -> None:
        self.name, self.host_ip, self.ns_ip = name, host_ip, ns_ip
        self.host_if, self.ns_if = "veth-obh", "veth-obn"

    @staticmethod
    def available() -> str | None:
        if shutil.which("ip") is None:
            return "iproute2 is not installed"
        probe = subprocess.run(["ip", "netns", "add", "outbox-probe"], capture_output=True,
                               text=True, check=False)
        if probe.returncode != 0:
            return f"ip netns add failed: {probe.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", "outbox-probe"], capture_output=True, check=False)
        return None

    def _ip(self, *args: str, netns: bool = False) -> None:
        command = ["ip", "netns", "exec", self.name, "ip", *args] if netns else ["ip", *args]
        subprocess.run(command, check=True, capture_output=True)

    def create(self) -> None:
        self.delete()
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self._ip("link", "set", self.ns_if, "netns", self.name)
        self._ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        self._ip("link", "set", self.host_if, "up")
        self._ip("addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if, netns=True)
        self._ip("link", "set", self.ns_if, "up", netns=True)
        self._ip("link", "set", "lo", "up", netns=True)

    def cut(self) -> None:
        self._ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        self._ip("link", "set", self.host_if, "up")

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)


class Forwarder:
    """TCP forwarding from the host's veth address to services on loopback, in a thread."""

    def __init__(self, listen_host: str, targets: dict[int, int]) -> None:
        self.listen_host = listen_host
        self.targets = targets  # listen port -> loopback port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.servers: list[asyncio.AbstractServer] = []

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    def _handler(self, target: int) -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(LOOPBACK, target)
            except OSError:
                writer.close()
                return
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        return handle

    def start(self) -> Forwarder:
        self.thread.start()
        for listen, target in self.targets.items():
            server = asyncio.run_coroutine_threadsafe(asyncio.start_server(
                self._handler(target), self.listen_host, listen), self.loop).result(10)
            self.servers.append(server)
        return self

    def stop(self) -> None:
        async def close() -> None:
            for server in self.servers:
                server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class NamespacedRelay(RelayProcess):
    """``outbox run`` inside a network namespace."""

    def __init__(self, namespace: Namespace, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.namespace = namespace

    def start(self) -> NamespacedRelay:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace.name, sys.executable, "-m",
                 "outbox.cli", "run"], env=self.env, stdout=subprocess.DEVNULL, stderr=log,
                cwd=ROOT)
        return self


def _with_host(url: str, host: str, port: int) -> str:
    from urllib.parse import urlsplit, urlunsplit  # noqa: PLC0415

    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def partitioned_relay(url: str, logs: Path, *, rows: int, cut_for: float) -> Outcome | None:
    """A relay in a namespace of its own loses its path to Postgres while it holds a claim;
    a relay on the host takes its rows once the lease runs out."""
    missing = Namespace.available()
    if missing is not None:
        return None
    reset(url)
    seed(url, rows)
    namespace = Namespace()
    namespace.create()
    pg_port = int(url.rsplit(":", 1)[1].split("/", 1)[0]) if "@" in url else 5432
    progress(f"partitioned-relay: {rows} rows, a 0.1 s device; relay A in netns "
             f"{namespace.name} cut off for {cut_for:.0f}s (claim timeout {CLAIM_TIMEOUT:.0f}s)")
    with SlowDevice(0.1) as device:
        assert isinstance(device, SlowDevice)
        db_port, dev_port = free_port(), free_port()
        forwarder = Forwarder(namespace.host_ip, {db_port: pg_port, dev_port: device.port}).start()
        a = NamespacedRelay(namespace, _with_host(url, namespace.host_ip, db_port),
                            device.url(namespace.host_ip, dev_port), SLOW,
                            log=logs / "chaos-partition-a.log", **relay_env())
        b = RelayProcess(url, device.url(), SLOW, log=logs / "chaos-partition-b.log",
                         **relay_env())
        try:
            a.start()
            wait(lambda: states(url).get("sent", 0) >= 5, 60, every=0.05)
            wait(lambda: len(claimed_by(url, a.pid)) > 1, 60, every=0.01)
            namespace.cut()
            cut_at = time.time()
            held = claimed_by(url, a.pid)
            progress(f"partitioned-relay: link down; relay A holds {len(held)} rows")
            b.start()
            b_started_at = time.time()
            taken = wait(lambda: len(sent_times(url, held)) == len(held),
                         CLAIM_TIMEOUT + 60, every=0.2)
            took = max(sent_times(url, held).values(), default=cut_at) - cut_at
            started_b = b_started_at - cut_at
            time.sleep(max(0.0, cut_for - (time.time() - cut_at)))
            namespace.heal()
            drained = drain(url, device, rows)
            a_alive = a.alive()
        finally:
            namespace.heal()
            codes = (a.stop(), b.stop())
            forwarder.stop()
            namespace.delete()
        result = delivery(url, device)
    # b starts only after the cut: its own start-up (~2 s) counts against the bound too
    passed = (taken and drained and result["lost"] == 0 and took <= CLAIM_TIMEOUT + 5
              and a_alive and result["duplicates"] <= len(held))
    summary = (f"held {len(held)} rows when cut off; the host's relay (started "
               f"{started_b:.1f}s after the cut) had them sent {took:.1f}s after the cut (bound "
               f"{CLAIM_TIMEOUT:.0f}+5 s); the cut-off relay survived={a_alive}; lost={result['lost']} "
               f"duplicates={result['duplicates']} states={result['states']} exits={codes}")
    return Outcome(passed, summary, {"held": len(held), "sent_after_seconds": took,
                                     "survived": a_alive, **result})


# --- a device that takes two seconds per SMS -------------------------------------------------


def _longest_transaction(url: str, seconds: float) -> float:
    """The longest-open transaction of any relay session, sampled every 0.1 s."""
    longest = 0.0
    deadline = time.monotonic() + seconds
    with connect(url) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT coalesce(max(extract(epoch FROM now() - xact_start)), 0)::float8 "
                "FROM pg_stat_activity WHERE application_name LIKE 'outbox relay %%' "
                "AND datname = current_database() AND xact_start IS NOT NULL").fetchone()
            longest = max(longest, float(row[0]) if row else 0.0)
            time.sleep(0.1)
    return longest


def _livez(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/livez", timeout=5) as reply:
            return int(reply.status) == 200
    except OSError:
        return False


def slow_device(url: str, logs: Path, *, rows: int, watch: float) -> Outcome:
    reset(url)
    seed(url, rows)
    progress(f"slow-device: {rows} rows, a 2 s device (one request at a time)")
    details: dict[str, Any] = {}
    with SlowDevice(2.0) as device:
        assert isinstance(device, SlowDevice)

        def relay(name: str, **extra: str) -> RelayProcess:
            return RelayProcess(url, device.url(), SLOW, log=logs / f"chaos-slow-{name}.log",
                                **relay_env(**extra))

        # 1. the longest transaction while it works, and SIGTERM-to-exit
        first = relay("term").start()
        details["longest_transaction_seconds"] = _longest_transaction(url, watch)
        first.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        asked = time.monotonic()
        first.process.wait(120)  # type: ignore[union-attr]
        details["sigterm_to_exit_seconds"] = time.monotonic() - asked
        details["sigterm_exit_code"] = first.process.returncode  # type: ignore[union-attr]
        with connect(url) as conn:
            details["leased_after_sigterm"] = conn.execute(
                "SELECT count(*) FROM outbox.message WHERE claim IS NOT NULL").fetchone()[0]  # type: ignore[index]

        # 2. SIGKILLs: what reaches the device twice
        kills = 3
        killed = relay("kill").start()
        for _ in range(kills):
            before = len(device.arrivals())
            wait(lambda: len(device.arrivals()) >= before + 2, 60)  # noqa: B023
            killed.kill()
            killed = relay("kill").start()
        time.sleep(CLAIM_TIMEOUT + 5)  # the killed relays' leases run out; rows go again
        killed.stop(75)
        counts = Counter(message_id for message_id, _ in device.arrivals())
        details["duplicates_after_sigkills"] = sum(n - 1 for n in counts.values())
        details["kills"] = kills

        # 3. systemd: SIGTERM, TimeoutStopSec=75, then SIGKILL
        unit = relay("systemd").start()
        time.sleep(5)
        unit.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        asked = time.monotonic()
        try:
            unit.process.wait(75)  # type: ignore[union-attr]
            details["systemd_killed"] = False
        except subprocess.TimeoutExpired:
            unit.kill()
            details["systemd_killed"] = True
        details["systemd_stop_seconds"] = time.monotonic() - asked

        # 4. Kubernetes: /livez every 10 s, restart after 3 failures in a row
        sent_before = states(url).get("sent", 0)
        port = free_port()
        pod = relay("k8s", OUTBOX_METRICS_PORT=str(port)).start()
        failures, restarts = 0, 0
        deadline = time.monotonic() + 2 * watch
        while time.monotonic() < deadline:
            time.sleep(10 if watch >= 60 else 2)
            if _livez(port):
                failures = 0
                continue
            failures += 1
            if failures >= 3:
                pod.kill()
                restarts += 1
                failures = 0
                pod = relay("k8s", OUTBOX_METRICS_PORT=str(port)).start()
        pod.stop(75)
        details["k8s_restarts"] = restarts
        details["k8s_sent"] = states(url).get("sent", 0) - sent_before

        # the rest, with an instant modem: nothing may be lost
        last = relay("drain").start()
        drained = drain(url, device, rows)
        last.stop()
        details.update(delivery(url, device))
    passed = (drained and details["lost"] == 0 and details["longest_transaction_seconds"] < 1.5
              and details["sigterm_to_exit_seconds"] < 5 + 2 and details["sigterm_exit_code"] == 0
              and details["leased_after_sigterm"] == 0
              and details["duplicates_after_sigkills"] <= details["kills"]
              and not details["systemd_killed"] and details["k8s_restarts"] == 0
              and details["k8s_sent"] > 0)
    summary = (f"longest relay transaction {details['longest_transaction_seconds']:.2f}s; "
               f"SIGTERM to exit {details['sigterm_to_exit_seconds']:.1f}s (code "
               f"{details['sigterm_exit_code']}, {details['leased_after_sigterm']} rows left "
               f"leased); {details['duplicates_after_sigkills']} SMS twice after "
               f"{details['kills']} SIGKILLs (bound: one in-flight request each); systemd stop "
               f"{details['systemd_stop_seconds']:.1f}s (killed={details['systemd_killed']}); "
               f"liveness restarts {details['k8s_restarts']} while {details['k8s_sent']} were "
               f"sent; lost={details['lost']} states={details['states']}")
    return Outcome(passed, summary, details)


__all__ = ["Namespace", "frozen_relay", "partitioned_relay", "slow_device"]

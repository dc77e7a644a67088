"""Fault injection for the guarantee tests, read from ``INFERWATCH_FAULT`` (comma-separated):

- ``kill_mid_batch:N`` — SIGKILL after batch N was processed and buffered, before any checkpoint
  wrote it;
- ``kill_after_flush:N`` — during checkpoint N, after the sinks flushed and before state and
  positions are saved (the worst moment);
- ``kill_after_save:N`` — during checkpoint N, after state and positions are saved and before the
  broker commit;
- ``kill_before_delivery:N`` — after checkpoint N is saved and before its alerts are delivered;
- ``sink_outage:N:S`` — from checkpoint N on, every call to the real store fails with the
  transient error class for S seconds of wall clock (the store itself stays up).

Kills are real ``SIGKILL`` s of the worker process; the outage wraps the real chdb sink, so
everything but the failure is the production path.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from streams.store.store import Store, TransientStoreError
from streams.worker.environment import Environment

FAULT_ENV = "INFERWATCH_FAULT"
KILL_POINTS = ("kill_mid_batch", "kill_after_flush", "kill_after_save", "kill_before_delivery")


class FaultSpecError(ValueError):
    pass


class Faults:
    def __init__(self, spec: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.kills: dict[str, int] = {}
        self.outage: tuple[int, float] | None = None  # (from checkpoint, seconds)
        self.outage_until: float | None = None
        self._clock = clock
        for item in filter(None, (p.strip() for p in spec.split(","))):
            name, _, rest = item.partition(":")
            try:
                if name in KILL_POINTS:
                    self.kills[name] = int(rest)
                elif name == "sink_outage":
                    n, s = rest.split(":")
                    self.outage = (int(n), float(s))
                else:
                    raise ValueError
            except ValueError:
                raise FaultSpecError(
                    f"{FAULT_ENV}={spec!r}: cannot read {item!r}; expected "
                    f"{'|'.join(KILL_POINTS)}:N or sink_outage:N:SECONDS"
                ) from None

    @classmethod
    def from_env(cls, env: Environment) -> Faults:
        return cls(env.fault)

    def kill(self, point: str, count: int) -> None:
        """SIGKILL this process if ``point`` is armed for the ``count``-th time it is reached."""
        if self.kills.get(point) == count:
            os.kill(os.getpid(), signal.SIGKILL)

    def checkpoint_starts(self, number: int) -> None:
        if self.outage is not None and self.outage_until is None and number >= self.outage[0]:
            self.outage_until = self._clock() + self.outage[1]

    def sink_down(self) -> bool:
        return self.outage_until is not None and self._clock() < self.outage_until

    def wrap(self, store: Store) -> Store:
        return FaultyStore(store, self) if self.outage is not None else store  # type: ignore[return-value]


class FaultyStore:
    """The real store, failing every call with :class:`TransientStoreError` while the injected
    outage lasts."""

    def __init__(self, store: Store, faults: Faults) -> None:
        self._store = store
        self._faults = faults

    def _check(self) -> None:
        if self._faults.sink_down():
            raise TransientStoreError(f"store {self._store.dsn} unreachable: injected outage")

    def query(self, *args: Any, **kw: Any) -> Any:
        self._check()
        return self._store.query(*args, **kw)

    def command(self, *args: Any, **kw: Any) -> Any:
        self._check()
        return self._store.command(*args, **kw)

    def insert_arrow(self, table: str, data: Any) -> None:
        self._check()
        self._store.insert_arrow(table, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._store, name, value)  # next_seq lives on the real store

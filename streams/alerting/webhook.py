"""The webhook route: POST an alert v1 JSON with ``Idempotency-Key: <alert_id>:<status>``.

Standard library only. 2xx is delivered; a 4xx other than 408/429 is a refusal (the receiver
will not take this body or these credentials: retrying cannot help until someone fixes it), kept
with the status and a bounded excerpt of the answer; 5xx, 408, 429 and connection errors are
transient: retried a bounded number of times with exponential backoff and full jitter, then left
to the next checkpoint. A timeout (no answer within ``timeout_s`` after the request was sent) is
neither: the receiver may have the delivery, so it is not retried at once; the outbox retries it
later with the same key, at most ``max_timeouts`` times in all. Sleep and randomness are
injected for tests.
"""

from __future__ import annotations

import http.client
import math
import random
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WEBHOOK_ENV = "INFERWATCH_WEBHOOK_URL"
TRANSIENT_4XX = (408, 429)
TIMED_OUT = -1  # _post's status for a request sent and not answered in time
EXCERPT_BYTES = 200  # of a refusing receiver's answer, kept with the delivery
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class RouteConfigError(ValueError):
    """A route is configured wrongly: fail at start-up."""


def validate_url(url: str) -> str:
    """The URL if it is http(s) with a host, else a RouteConfigError saying what was expected.

    >>> validate_url("https://hooks.example.com/inferwatch")
    'https://hooks.example.com/inferwatch'
    >>> validate_url("hooks.example.com")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    streams.alerting.webhook.RouteConfigError: webhook 'hooks.example.com': expected http...
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RouteConfigError(f"webhook {url!r}: expected http(s)://HOST[:PORT]/PATH")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise RouteConfigError(f"webhook {url!r}: bad port ({exc})") from None
    return url


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    url: str
    ca_file: Path | None = None
    timeout_s: float = 5.0  # for an answer; a request started within the budget gets all of it
    max_attempts: int = 3  # per delivery round; the next checkpoint tries again
    max_timeouts: int = 3  # in all, per delivery: each timed-out attempt may have arrived
    backoff_base_s: float = 0.2
    backoff_max_s: float = 5.0
    notify: str = "alerts"  # or "incidents": one POST per group notification


@dataclass(frozen=True, slots=True)
class Outcome:
    """``delivered``; else ``permanent`` (refused, do not retry) or transient; ``attempts``
    made, the last HTTP ``status`` (0: none), and ``timeouts`` among the attempts."""

    delivered: bool
    permanent: bool
    error: str
    attempts: int
    status: int = 0
    timeouts: int = 0


def excerpt(body: bytes) -> str:
    """A receiver's answer as one bounded line, control characters escaped.

    >>> excerpt(b'{"error": "token expired"}\\r\\n'), excerpt(b"no\\x1b[2J\\nway")
    ('{"error": "token expired"}', 'no\\\\x1b[2J\\\\nway')
    """
    text = body[:EXCERPT_BYTES].decode("utf-8", "replace").strip()
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


class WebhookRoute:
    def __init__(
        self,
        settings: WebhookSettings,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        validate_url(settings.url)
        if settings.notify not in ("alerts", "incidents"):
            raise RouteConfigError(f"notify {settings.notify!r}: expected alerts or incidents")
        for name in ("timeout_s", "backoff_base_s", "backoff_max_s"):
            value = getattr(settings, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise RouteConfigError(f"webhook {name} {value!r}: expected seconds >= 0")
        if settings.timeout_s <= 0:
            raise RouteConfigError(f"webhook timeout_s {settings.timeout_s!r}: expected > 0")
        if min(settings.max_attempts, settings.max_timeouts) < 1:
            raise RouteConfigError("webhook max_attempts and max_timeouts: expected >= 1")
        self.grouped = settings.notify == "incidents"
        self.name = "webhook"
        self.max_timeouts = settings.max_timeouts
        self._sleep = sleep
        self._rand = rand
        self._clock = clock
        self._ssl: ssl.SSLContext | None = None
        if settings.url.startswith("https:"):
            ca = str(settings.ca_file) if settings.ca_file else None
            self._ssl = ssl.create_default_context(cafile=ca)

    def deliver(self, key: str, payload: bytes, deadline: float | None = None) -> Outcome:
        """POST ``payload`` with idempotency ``key``; starts no new attempt after ``deadline``
        (monotonic). An attempt that gets no answer in time ends the round: the receiver may
        have it, so hammering it again now would only repeat it."""
        s = self.settings
        error, status = "", 0
        for attempt in range(s.max_attempts):
            if attempt:
                delay = self._rand() * min(s.backoff_max_s, s.backoff_base_s * 2**attempt)
                if deadline is not None and self._clock() + delay >= deadline:
                    return Outcome(False, False, error, attempt, status)
                self._sleep(delay)
            status, error = self._post(key, payload, s.timeout_s)
            if status == TIMED_OUT:
                return Outcome(False, False, error, attempt + 1, 0, timeouts=1)
            if 200 <= status < 300:
                return Outcome(True, False, "", attempt + 1, status)
            if 400 <= status < 500 and status not in TRANSIENT_4XX:
                return Outcome(False, True, error, attempt + 1, status)
        return Outcome(False, False, error, s.max_attempts, status)

    def _post(self, key: str, payload: bytes, timeout_s: float) -> tuple[int, str]:
        """(HTTP status, error text); status 0 for a connection error, ``TIMED_OUT`` when the
        request went out and no answer came in time."""
        request = urllib.request.Request(
            self.settings.url,
            data=payload,
            method="POST",
            headers={"Content-Type": "application/json", "Idempotency-Key": key},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s, context=self._ssl) as resp:
                resp.read()
                return int(resp.status), ""
        except urllib.error.HTTPError as exc:
            return exc.code, f"HTTP {exc.code}: {excerpt(exc.read(EXCERPT_BYTES))}".strip()
        except TimeoutError:  # raised bare while waiting for the answer (URLError on connect)
            return TIMED_OUT, f"no answer within {timeout_s:g} s (the receiver may have it)"
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            return 0, f"{type(exc).__name__}: {exc}"[:300]

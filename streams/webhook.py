"""The webhook route: POST an alert v1 JSON with ``Idempotency-Key: <alert_id>:<status>``.

Standard library only. 2xx is delivered; a 4xx other than 408/429 is a permanent refusal (the
receiver will not accept this body, so retrying cannot help); 5xx, 408, 429 and connection
errors are transient: retried a bounded number of times with exponential backoff and full
jitter, then left to the next checkpoint. Sleep and randomness are injected for tests.
"""

from __future__ import annotations

import http.client
import random
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


class RouteConfigError(ValueError):
    """A route is configured wrongly: fail at start-up."""


def validate_url(url: str) -> str:
    """The URL if it is http(s) with a host, else a RouteConfigError saying what was expected.

    >>> validate_url("https://hooks.example.com/inferwatch")
    'https://hooks.example.com/inferwatch'
    >>> validate_url("hooks.example.com")
    Traceback (most recent call last):
    ...
    streams.webhook.RouteConfigError: webhook 'hooks.example.com': expected http(s)://HOST[:PORT]/PATH
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
    timeout_s: float = 5.0
    max_attempts: int = 3  # per delivery round; the next checkpoint tries again
    backoff_base_s: float = 0.2
    backoff_max_s: float = 5.0
    notify: str = "alerts"  # or "incidents": one POST per group notification


@dataclass(frozen=True, slots=True)
class Outcome:
    """``delivered``; else ``permanent`` (refused, do not retry) or transient; ``attempts`` made."""

    delivered: bool
    permanent: bool
    error: str
    attempts: int


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
        self.grouped = settings.notify == "incidents"
        self.name = "webhook"
        self._sleep = sleep
        self._rand = rand
        self._clock = clock
        self._ssl: ssl.SSLContext | None = None
        if settings.url.startswith("https:"):
            ca = str(settings.ca_file) if settings.ca_file else None
            self._ssl = ssl.create_default_context(cafile=ca)

    def deliver(self, key: str, payload: bytes, deadline: float | None = None) -> Outcome:
        """POST ``payload`` with idempotency ``key``; stops retrying at ``deadline`` (monotonic)."""
        s = self.settings
        error = ""
        for attempt in range(s.max_attempts):
            if attempt:
                delay = self._rand() * min(s.backoff_max_s, s.backoff_base_s * 2**attempt)
                if deadline is not None and self._clock() + delay >= deadline:
                    return Outcome(False, False, error, attempt)
                self._sleep(delay)
            timeout = s.timeout_s
            if deadline is not None:
                timeout = min(timeout, max(deadline - self._clock(), 0.1))
            status, error = self._post(key, payload, timeout)
            if 200 <= status < 300:
                return Outcome(True, False, "", attempt + 1)
            if 400 <= status < 500 and status not in TRANSIENT_4XX:
                return Outcome(False, True, error, attempt + 1)
        return Outcome(False, False, error, s.max_attempts)

    def _post(self, key: str, payload: bytes, timeout_s: float) -> tuple[int, str]:
        """(HTTP status, error text); status 0 for a connection error."""
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
            body = exc.read(200).decode("utf-8", "replace")
            return exc.code, f"HTTP {exc.code}: {body}".strip()
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            return 0, f"{type(exc).__name__}: {exc}"[:300]

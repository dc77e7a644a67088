"""The ``INFERWATCH_*`` environment, read once where the program starts and passed down.

:meth:`Environment.read` is the one place in streams/ that reads ``os.environ``; the CLI calls it
when a command starts, and the worker, the configuration loader, the secrets and the fault
injector take what it read. :data:`VARIABLES` lists every variable the code reads (the README's
configuration section lists the same ones; a test checks both). A secret may also come from the
file its ``_FILE`` variant names (``streams/store/credentials.py``).

>>> env = Environment.of({"INFERWATCH_OPERATOR": "alice", "HOME": "/root"})
>>> env.operator, dict(env.values)
('alice', {'INFERWATCH_OPERATOR': 'alice'})
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

PREFIX = "INFERWATCH_"
# every variable the code reads; ``<KEY>`` and ``<SETTING>`` name a family; (secret) ones also
# have a ``_FILE`` variant
VARIABLES = {
    "INFERWATCH_CONFIG": "the configuration file",
    "INFERWATCH_STORE": "store.dsn",
    "INFERWATCH_STORE_PASSWORD": "the server store's password (secret)",
    "INFERWATCH_HMAC_KEY": "the key of the text and message fingerprints (secret)",
    "INFERWATCH_WEBHOOK_URL": "routes.webhook.url, which carries its token (secret)",
    "INFERWATCH_WEBHOOK_CA_FILE": "routes.webhook.ca_file",
    "INFERWATCH_WORKER_<KEY>": "any key of [worker], e.g. INFERWATCH_WORKER_BATCH_SIZE",
    "INFERWATCH_KAFKA_<SETTING>": "a librdkafka setting, e.g. INFERWATCH_KAFKA_SASL_MECHANISM",
    "INFERWATCH_OPERATOR": "who acts in analyst commands, else the OS user",
    "INFERWATCH_FAULT": "fault injection for the guarantee tests (never in production)",
}


@dataclass(frozen=True, slots=True)
class Environment:
    """The ``INFERWATCH_*`` variables as they were when the program started."""

    values: Mapping[str, str]

    @classmethod
    def of(cls, environ: Mapping[str, str]) -> Environment:
        """The ``INFERWATCH_*`` variables of ``environ``, frozen."""
        kept = {k: v for k, v in environ.items() if k.startswith(PREFIX)}
        return cls(MappingProxyType(kept))

    @classmethod
    def read(cls) -> Environment:
        """The process environment, now (call it where the program starts)."""
        return cls.of(os.environ)

    @property
    def operator(self) -> str | None:
        return self.values.get("INFERWATCH_OPERATOR") or None

    @property
    def fault(self) -> str:
        return self.values.get("INFERWATCH_FAULT", "")

"""Fixtures shared by the tests; helpers live in tests/support/."""

from tests.support.kafka import cluster  # noqa: F401 - fixtures shared by the tests
from tests.support.receiver import receiver  # noqa: F401 - fixtures shared by the tests

"""The ClickHouse store and the rows written to it."""

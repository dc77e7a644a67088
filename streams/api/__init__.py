"""The worker's local API: server, client, queries."""

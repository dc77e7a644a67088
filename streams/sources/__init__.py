"""Where messages come from: the source protocol, files, Kafka."""

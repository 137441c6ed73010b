"""What every CRM service shares: settings, logging, telemetry, database, outbox, consumer, gRPC."""

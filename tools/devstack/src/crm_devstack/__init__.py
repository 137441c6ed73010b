"""The whole CRM on one machine: a tansu broker, every service and the gateway, on SQLite files."""

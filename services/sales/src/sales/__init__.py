"""The sales service: pipelines, opportunities, quotes, contracts, payment plans, payments, invoices."""

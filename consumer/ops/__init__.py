"""Operator commands behind ``python -m consumer check|inspect|replay-dlq|sweep``."""

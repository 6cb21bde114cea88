"""evaljoin: joins NeMo Evaluator results with LLM Observability spans and delivers them to Datadog."""

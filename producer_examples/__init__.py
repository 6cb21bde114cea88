"""Programs that publish to the service's topics: the app side, the NeMo Evaluator side, backfill."""

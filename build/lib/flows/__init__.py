"""Prefect flows (the only code that imports Prefect): the pipeline, the scheduled retrain, and studies."""

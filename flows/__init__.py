"""Prefect flows (the only code that imports Prefect): the pipeline, the scheduled retrain, and studies.

Prefect reads its settings when it is first imported, so the defaults every flow wants are set here, before
any flow module imports it (a value you set in the environment wins)."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines: no telemetry calls
# the temporary server's first start on a machine creates its database: measured over Prefect's 20 s default on
# a busy 16-core GPU host (the flow then failed before its first stage)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

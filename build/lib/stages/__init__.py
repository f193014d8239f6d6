"""DVC stages: one file each; `dvc repro` runs them as scripts, the Prefect flow calls the same functions."""

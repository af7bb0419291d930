"""The MLflow model registry behind a narrow interface: aliases resolve to one pinned version."""

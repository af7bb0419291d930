"""batchscore: batch and scheduled scoring on Airflow, MLflow, Dask and a KV store."""

__version__ = "0.1.0"

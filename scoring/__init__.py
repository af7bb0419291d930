"""Scoring: plan shards of Parquet input, score them with a model on Dask, write parts."""

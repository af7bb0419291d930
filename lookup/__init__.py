"""The real-time lookup API over the KV store, with a fallback to the run's batch output."""

"""Continuous batching: requests, the scheduler, the paged KV cache, one step's batch, and the engine loop."""

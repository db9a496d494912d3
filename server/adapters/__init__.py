"""Adapters at serving time: the paged device pool, the manager (tiers, LRU, pins), per-step batch metadata."""

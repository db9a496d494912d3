"""The OpenAI-compatible HTTP API (Completions, Chat Completions, Models, vLLM's LoRA admin endpoints)."""

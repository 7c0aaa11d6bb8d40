"""The OpenAI-compatible endpoint under /v1 (docs/openai-compat.md)."""

"""Writer endpoints under /api/ai/: generate text, suggest topics, optimize content (metered as "writer")."""

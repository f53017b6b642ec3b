"""Model runtime, engine and serving processes (attention and expert ranks)."""

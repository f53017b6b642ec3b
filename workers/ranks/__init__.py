"""Serving rank programs: attention ranks (engine + lockstep loop) and expert ranks of one model instance."""

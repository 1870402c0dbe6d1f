"""Prefect flows: oel-iteration (one round), oel-loop (N rounds), serve (the local deployment)."""

"""Core step kinds: source, sql, polars, dedup (see datamill/registry.py)."""

"""Prefect flows that wire the stages, and the `fermine` CLI."""

"""The stages' computations: plain functions over artifacts, called by flows and by tests."""

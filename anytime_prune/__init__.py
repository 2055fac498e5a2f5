"""Command line and Python client of the APP training service."""

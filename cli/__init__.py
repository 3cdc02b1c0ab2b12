"""Command-line entry points: thin click wrappers over the embstore library."""

"""Command line entry points, config schema and launchers."""

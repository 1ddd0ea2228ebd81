"""The package version, in one place (read by pyproject.toml too)."""

__version__ = "2.0.0"

"""dist package."""

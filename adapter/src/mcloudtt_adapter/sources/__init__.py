"""Sources: where messages come from."""

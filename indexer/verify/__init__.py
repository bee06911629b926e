"""Check a collection against its manifest and repair what is damaged."""

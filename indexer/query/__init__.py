"""Query a published collection: nearest neighbours, filters, stored items, duplicates."""

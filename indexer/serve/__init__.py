"""The search service: published collections over HTTP, reloaded as builds publish."""

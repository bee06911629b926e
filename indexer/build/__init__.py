"""The build: list -> plan -> embed -> write shards -> index -> publish (local engine or Ray)."""

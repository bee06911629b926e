"""The collection directory on disk: layout, manifest, shards, versions, lock and run history."""

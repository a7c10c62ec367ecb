"""Pipeline steps: each reads validated artifacts from a run directory and writes new ones."""

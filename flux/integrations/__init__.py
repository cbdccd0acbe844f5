"""Optional integrations, each in its own package. The core reaches them only through the hooks of
flux/plugins.py, so any of them can be read, changed or removed alone (docs/architecture.md)."""

"""`flux status` and `flux plot`: views of a run directory."""

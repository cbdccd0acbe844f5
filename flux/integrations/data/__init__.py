"""Prompts read with the `datasets` library: JSON, parquet, CSV and arrow files, saved datasets, Hub datasets."""

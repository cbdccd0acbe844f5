"""`prompts` read with HF `datasets` (flux.data.load_prompts sends everything but JSONL here).

A file by its suffix (.json, .parquet, .csv, .arrow), a directory written by `save_to_disk` or holding
data files, or a Hub dataset id found in the local HF cache (hub.py, as models are found).
A dataset with several splits gives `data.split`. Rows come back as plain dicts (nested columns as dicts,
lists as lists), checked row by row by flux.data.to_record.
"""

from __future__ import annotations

from pathlib import Path

from flux.data import DataError

READERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def read_rows(source: str, split: str = "train") -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: reading it needs the `datasets` library: pip install 'flux-rlhf[data]'") from None
    path = Path(source)
    if not path.exists():
        from flux.integrations.data.hub import HUB_ID, hub_snapshot

        if not HUB_ID.match(source):
            raise DataError(f"{source}: no such prompts file, directory or dataset")
        try:
            path = Path(hub_snapshot(source, "prompts", repo_type="dataset"))
        except ValueError as e:
            raise DataError(str(e).removeprefix("prompts: ")) from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        if path.is_file():
            if path.suffix not in READERS:
                raise DataError(f"{source}: Flux reads {', '.join(READERS)} files, a dataset directory or a "
                                f"Hub dataset id")
            ds = datasets.load_dataset(READERS[path.suffix], data_files=str(path), split="train")
        elif (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(str(path))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 (pyarrow's and datasets' many parse errors: one line)
        raise DataError(f"{source}: `datasets` could not read it: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{source}: no split {split!r} (data.split; it has {', '.join(ds)})")
        ds = ds[split]
    return ds.to_list()

"""Opening the table formats: Arrow IPC files (file or stream format) and `datasets.save_to_disk` folders.
Parquet is opened with `pyarrow.parquet` where it is read.

Part of the reading rule (`rule.READING_RULE_MODULES`): which reader opens a file decides its rows and their order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from ..cli import UsageError, first_line


def arrow_reader(path: str):
    """An Arrow IPC reader over a memory map: the file format if the file has its footer, else the stream
    format (what `datasets` writes). Its record batches in order: `arrow_batches`."""
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source)


def arrow_batches(reader) -> Iterator:
    """The record batches of an `arrow_reader`, in order (a file-format reader's by index, lazily)."""
    if hasattr(reader, "num_record_batches"):
        for index in range(reader.num_record_batches):
            yield reader.get_batch(index)
    else:
        yield from reader


def load_saved(path: str):
    """The `datasets.Dataset` of a `datasets.save_to_disk` folder. UsageError for a folder `datasets` cannot load,
    or one holding several splits (naming the folder of the first)."""
    import datasets

    try:
        dataset = datasets.load_from_disk(path)
    except Exception as error:  # datasets raises FileNotFoundError, ValueError, its own errors
        raise UsageError(f"{path} cannot be read as a datasets.save_to_disk folder: {first_line(error)}") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise UsageError(f"{path} holds the splits {list(dataset)}: name one of their folders, e.g. {os.path.join(path, next(iter(dataset)))}")
    return dataset

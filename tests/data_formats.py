"""The documents the readers' tests write in every format (`write_all_formats`, the `formats` fixture of conftest.py),
and Python's own reading of a text file's lines (`python_lines`), the reference for line ends."""

import bz2
import gzip
import json
import lzma

TEXTS = [f"Document {i}: naïve café — “quoted” {'word ' * (i % 7)}日本語 {i * i}" for i in range(120)]


def write_all_formats(folder) -> dict:
    """The documents TEXTS in each format the readers accept: {name: path}."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    jsonl = "".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(TEXTS))
    txt = "".join(t + "\n" for t in TEXTS)
    files = {}

    def put(name, data: bytes):
        (folder / name).write_bytes(data)
        files[name] = str(folder / name)

    put("a.jsonl", jsonl.encode())
    put("a.ndjson", jsonl.encode())
    put("a.ndjson.gz", gzip.compress(jsonl.encode()))
    put("a.json", json.dumps([{"text": t} for t in TEXTS]).encode())
    put("a.txt", txt.encode())
    put("crlf_bom.txt", b"\xef\xbb\xbf" + txt.replace("\n", "\r\n").encode())
    put("bom.jsonl", b"\xef\xbb\xbf" + jsonl.encode())
    put("a.jsonl.gz", gzip.compress(jsonl.encode()))
    put("a.jsonl.xz", lzma.compress(jsonl.encode()))
    put("a.jsonl.bz2", bz2.compress(jsonl.encode()))
    put("a.jsonl.zst", zstandard.ZstdCompressor().compress(jsonl.encode()))
    put("a.txt.zst", zstandard.ZstdCompressor().compress(txt.encode()))
    put("cr.txt", txt.replace("\n", "\r").encode())  # old Mac line ends
    ends = ["\n", "\r", "\r\n", "\r\r\n"]  # \r\r\n: a line end, then an empty line
    put("mixed.txt.gz", gzip.compress("".join(t + ends[i % 4] for i, t in enumerate(TEXTS)).encode()))
    table = pa.table({"id": list(range(len(TEXTS))), "text": TEXTS})
    pq.write_table(table, folder / "a.parquet", row_group_size=25)
    files["a.parquet"] = str(folder / "a.parquet")
    for name, writer in (("stream.arrow", pa.ipc.new_stream), ("file.arrow", pa.ipc.new_file)):
        with writer(str(folder / name), table.schema) as out:
            for batch in table.to_batches(max_chunksize=30):
                out.write_batch(batch)
        files[name] = str(folder / name)
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(folder / "saved"), num_shards=2)
    files["saved"] = str(folder / "saved")
    return files


def python_lines(path) -> list[str]:
    """The non-blank lines of a text file as Python's universal newlines read them (the reference)."""
    with open(path, encoding="utf-8", newline=None) as handle:
        return [line for line in handle.read().split("\n") if line.strip()]

"""A data set's source (`patch_training.readers.source.DataSource`): the start of each file that `--streaming`
reads before it claims the output folder."""

import json

import pytest

from patch_training import readers
from patch_training.cli import UsageError
from patch_training.readers import DataSource


def test_check_starts_reads_the_first_documents_of_each_file(tmp_path, monkeypatch):
    """`DataSource.check_starts` (what --streaming reads before it claims the output folder): the first
    START_DOCUMENTS documents of each line file (a bad record among them is one line naming it, one after them
    is left to the stream), a table's schema only, fewer documents a file when there are many (START_BUDGET in
    all), and "no text" only when every file was read to its end without one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def lines(name, texts):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        return str(tmp_path / name)

    check = lambda *paths: DataSource.from_files(",".join(paths), "train_file").check_starts()
    start = readers.source.START_DOCUMENTS
    with pytest.raises(UsageError, match=r"early.jsonl, record 50: its 'text' is an int, not text$"):
        check(lines("early.jsonl", ["fine"] * 49 + [7]))
    check(lines("late.jsonl", ["fine"] * (start + 1) + [7]))  # found by the stream, after the claim
    with pytest.raises(UsageError, match=r"^the streamed training data holds no text$"):
        check(lines("blank.jsonl", [""] * (start - 1)), lines("nulls.jsonl", [None] * 3))
    check(lines("long_blank.jsonl", [""] * start))  # not known to end there: the stream will tell
    pq.write_table(pa.table({"text": [None, None]}), tmp_path / "nulls.parquet")
    check(str(tmp_path / "blank.jsonl"), str(tmp_path / "nulls.parquet"))  # a table's rows are not read
    monkeypatch.setattr(readers.source, "START_BUDGET", 20)
    check(*[lines(f"many{i}.jsonl", ["fine"] * 10 + [7]) for i in range(2)])  # 10 documents a file
    with pytest.raises(UsageError, match=r"many_2.jsonl, record 6: "):
        check(*[lines(f"many_{i}.jsonl", ["fine"] * (5 if i == 2 else 6) + [7]) for i in range(3)])  # 6 a file

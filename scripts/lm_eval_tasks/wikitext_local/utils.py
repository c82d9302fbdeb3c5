"""Data loader of the `wikitext_local` task: the bundled WikiText-103 test set, read from disk (no hub).

The detokeniser and the metrics are lm-eval's own `wikitext` task functions, so the two tasks score the
same documents identically; they read a document's text from `page`, so the loader renames `text`."""

from pathlib import Path

import datasets
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401

DEFAULT_DATA_FILE = Path(__file__).resolve().parents[3] / "data" / "wikitext-103-test.jsonl"


def load_wikitext_local(data_file=None, **_metadata) -> datasets.DatasetDict:
    """{"test": documents with a `page` column} from a JSON-lines file of {"text": ...} (default: the bundled
    WikiText-103 test set, wherever lm_eval is run from)."""
    path = Path(data_file) if data_file else DEFAULT_DATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"wikitext_local: data file {path} does not exist")
    dataset = datasets.load_dataset("json", data_files={"test": str(path)})
    return dataset.rename_column("text", "page")

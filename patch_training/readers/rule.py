"""The reading rule: the code that decides which documents a data file becomes, and its version.

`READING_RULE_VERSION` is part of every token cache key (`token_cache.cache_key`, beside the tokenisation rule's
`token_cache.TOKENIZATION_RULE_VERSION`) and of a run's record: a cache or a run made under another rule is not
taken for this one. The rule is the code of the modules `READING_RULE_MODULES` of this package:

- `formats`: a file's format from its name (text lines, JSON lines or list, Parquet, Arrow, saved dataset);
- `compression`: the bytes a compressed file holds;
- `lines`: where a line ends (`\\n`, `\\r\\n` or a bare `\\r` in text; `\\n` in JSON lines), the byte-order mark,
  whether a JSON file holds one list, reading on from a recorded line;
- `tables`: the reader that opens an Arrow file (file or stream format) and the order of its batches, the dataset
  a saved folder loads as;
- `documents`: which lines, records, rows and columns become documents: JSON parsing, blank lines, nulls.

The other modules cannot change the documents of a file that reads, so they are not versioned: `files` (which files
a spec names: each file's path and `content_stamp` are in the keys themselves), `sniffing` and `checks` (they only
refuse a file or a record), `parts` (reading a file's parts in order gives the documents of the whole file, checked
for every format by tests/test_readers_parts.py and tests/test_readers_lines.py) and `source` (which puts the others
together). Documents read from the hub through `datasets` are `datasets`' own.

`READING_RULE_SOURCE_HASH` is a SHA-256 of those modules' syntax trees without docstrings, so comments, docstrings
and formatting do not count; tests/test_rule_versions.py recomputes it and fails, naming the new hash, when the code
changed and the version did not. Any change of that code asks for `READING_RULE_VERSION + 1`, even one that cannot
change a document (the test cannot tell): each bump makes every user tokenise their data once more, so code that
only refuses or reports belongs in the modules that are not versioned.
"""

READING_RULE_VERSION = 1
READING_RULE_MODULES = ("formats", "compression", "lines", "tables", "documents")
READING_RULE_SOURCE_HASH = "724aaa19c9384c765cf5a04e310ecfca06ad54c2d04130d2bd4e3ece9ffcca42"

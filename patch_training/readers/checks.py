"""What a record or a table must hold to give a document, and the words of the one-line errors that say what is
wrong: a missing text field or column, a value that is not text, text that is not valid Unicode.

Not part of the reading rule (`rule.READING_RULE_MODULES`): a check only refuses a record, never changes the
documents of a file that reads (null texts pass here and are skipped at tokenisation, see
`token_cache.iter_token_batches`).
"""

from __future__ import annotations

from ..cli import UsageError


def text_problem(record, text_column: str) -> str | None:
    """What is wrong with a record's text, or None: no `text_column` field, a value other than text or null, or
    text that is not valid Unicode (a lone surrogate, which a JSON escape such as "\\ud800" can make: the
    tokenizer would fail on it)."""
    if not isinstance(record, dict):
        return f"not a JSON object with a {text_column!r} field (found {a_type_name(record)})"
    if text_column not in record:
        return f"no {text_column!r} field (found {list(record)}); set --text_column_name"
    text = record[text_column]
    if text is not None and not isinstance(text, str):
        return f"its {text_column!r} is {a_type_name(text)}, not text"
    if text and not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            return (f"its {text_column!r} holds a lone surrogate ({ascii(text[error.start])[1:-1]} at character "
                    f"{error.start + 1}), not valid Unicode")
    return None


def check_text(path: str, where: str, record, text_column: str) -> dict:
    """`record`, a JSON value read at `where` of `path`; UsageError naming both unless it is an object whose
    `text_column` is text or null (see `text_problem`)."""
    problem = text_problem(record, text_column)
    if problem:
        raise UsageError(f"{path}, {where}: {problem}")
    return record


def check_column(path: str, schema, text_column: str) -> None:
    """UsageError unless the Arrow `schema` of the table `path` has a string column `text_column` (named with the
    columns found)."""
    import pyarrow as pa

    if text_column not in schema.names:
        raise UsageError(f"{path}: no {text_column!r} column (found {schema.names}); set --text_column_name")
    kind = schema.field(text_column).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind) or pa.types.is_null(kind)):
        raise UsageError(f"{path}: its {text_column!r} column holds {kind}, not text")


def a_type_name(value) -> str:
    """The type of `value` with its article, for messages: 'an int', 'a str', 'an ndarray', 'a uint8', 'a NoneType'."""
    name = type(value).__name__
    return f"{indefinite_article(name)} {name}"


def indefinite_article(word: str) -> str:
    """'an' before a word said with a vowel sound ('an int', 'an object', 'an ndarray'), else 'a' ('a list', 'a
    uint8', 'a unicode string'): by its first letter, 'u' sounded 'you' in uint/uni/usa/use/uu, and nd- read
    letter by letter."""
    lower = word.lower()
    if lower.startswith(("uint", "uni", "usa", "use", "usu", "uu", "one")):
        return "a"
    return "an" if lower[:1] in tuple("aeiou") or lower.startswith("nd") else "a"

"""The two rule versions in every token cache key follow the code they version: the reading rule
(`readers.rule.READING_RULE_VERSION`: files -> documents) and the tokenisation rule
(`token_cache.TOKENIZATION_RULE_VERSION`: documents -> tokens). Each is recorded with a hash of its code's syntax
trees without docstrings; a change of that code without a new version (which would let every cache serve the
tokens of the old code) fails here, naming the version to set and the hash to record."""

import ast
import hashlib
import os

import pytest
from conftest import REPO_ROOT

from patch_training import token_cache
from patch_training.readers import rule

READERS = REPO_ROOT / "patch_training" / "readers"


def without_docstrings(tree: ast.AST) -> ast.AST:
    """`tree` with the docstring of the module and of every class and function removed (in place)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:]
    return tree


def canonical(node) -> str:
    """A text of a syntax tree: node types and their fields, without positions, leaving out fields that are None
    or empty (`ast.dump` writes those differently from one Python version to the next, and new versions add such
    fields, as 3.12 did `type_params`), so that the hash does not depend on the Python version that computes it."""
    if isinstance(node, ast.AST):
        fields = [f"{name}={canonical(value)}" for name in node._fields
                  if (value := getattr(node, name, None)) is not None and value != []]
        return f"{type(node).__name__}({', '.join(fields)})"
    if isinstance(node, list):
        return f"[{', '.join(canonical(item) for item in node)}]"
    return repr(node)


def syntax_hash(trees: list[ast.AST]) -> str:
    """SHA-256 (hex) of the `canonical` texts of `trees` without their docstrings: comments, docstrings and
    formatting do not change it, any change of the code does."""
    digest = hashlib.sha256()
    for tree in trees:
        digest.update(canonical(without_docstrings(tree)).encode() + b"\n")
    return digest.hexdigest()


def reading_rule_hash() -> str:
    """`syntax_hash` of the modules of the reading rule (`rule.READING_RULE_MODULES`), in that order."""
    return syntax_hash([ast.parse((READERS / f"{name}.py").read_text(encoding="utf-8"))
                        for name in rule.READING_RULE_MODULES])


def tokenization_rule_hash() -> str:
    """`syntax_hash` of the functions of the tokenisation rule (`token_cache.TOKENIZATION_RULE_CODE`), in that order."""
    module = ast.parse((REPO_ROOT / "patch_training" / "token_cache.py").read_text(encoding="utf-8"))
    functions = {node.name: node for node in module.body if isinstance(node, ast.FunctionDef)}
    missing = [name for name in token_cache.TOKENIZATION_RULE_CODE if name not in functions]
    assert not missing, f"TOKENIZATION_RULE_CODE names {missing}, not functions of token_cache.py"
    return syntax_hash([functions[name] for name in token_cache.TOKENIZATION_RULE_CODE])


def test_reading_rule_version_follows_its_code():
    found = reading_rule_hash()
    assert found == rule.READING_RULE_SOURCE_HASH, (
        f"reading code changed ({', '.join(rule.READING_RULE_MODULES)} of patch_training/readers/): bump "
        f"READING_RULE_VERSION to {rule.READING_RULE_VERSION + 1} and set READING_RULE_SOURCE_HASH = '{found}' in "
        "patch_training/readers/rule.py")


def test_tokenization_rule_version_follows_its_code():
    found = tokenization_rule_hash()
    assert found == token_cache.TOKENIZATION_RULE_SOURCE_HASH, (
        f"tokenisation code changed ({', '.join(token_cache.TOKENIZATION_RULE_CODE)} of patch_training/token_cache.py): "
        f"bump TOKENIZATION_RULE_VERSION to {token_cache.TOKENIZATION_RULE_VERSION + 1} and set "
        f"TOKENIZATION_RULE_SOURCE_HASH = '{found}' in patch_training/token_cache.py")


def test_every_module_of_the_reading_rule_exists():
    assert all((READERS / f"{name}.py").is_file() for name in rule.READING_RULE_MODULES), rule.READING_RULE_MODULES


CODE = '''"""A module."""
LIMIT = 3  # a limit


def f(x):
    """Docstring."""
    # a comment
    return [x,
            LIMIT]
'''
SAME_CODE = '''"""Another module docstring."""

LIMIT = 3


def f(x):
    """Another docstring, longer."""
    return [x, LIMIT]  # another comment
'''


@pytest.mark.parametrize("changed", [
    CODE.replace("LIMIT = 3", "LIMIT = 4"),
    CODE.replace("return [x,", "return [-x,"),
    CODE.replace("def f(x):", "def f(y):").replace("[x,", "[y,"),
    CODE.replace("    # a comment\n", "    x = x.strip()\n"),
    CODE + "\n\ndef g():\n    pass\n",
])
def test_the_hash_ignores_comments_docstrings_and_formatting_only(changed):
    """The checker itself: comments, docstrings, blank lines and line breaks do not change the hash; a changed
    constant, expression, name, statement or a new function does."""
    assert syntax_hash([ast.parse(CODE)]) == syntax_hash([ast.parse(SAME_CODE)])
    assert syntax_hash([ast.parse(CODE)]) != syntax_hash([ast.parse(changed)])


def test_the_cache_key_holds_both_rules_and_each_source_with_its_stamp(tmp_path, tokenizer, monkeypatch):
    """`token_cache.cache_key` changes with each rule version, with a data file rewritten in place (its
    `content_stamp`), with a file added to a folder, and with the path of the same content."""
    data = tmp_path / "a.jsonl"
    data.write_text('{"text": "one"}\n')
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    sources = [str(data), str(folder)]

    def key():
        return token_cache.cache_key(sources, tokenizer, "text")

    first = key()
    assert key() == first
    monkeypatch.setattr(token_cache, "READING_RULE_VERSION", token_cache.READING_RULE_VERSION + 1)
    reading = key()
    monkeypatch.undo()
    monkeypatch.setattr(token_cache, "TOKENIZATION_RULE_VERSION", token_cache.TOKENIZATION_RULE_VERSION + 1)
    tokenization = key()
    monkeypatch.undo()
    assert len({first, reading, tokenization}) == 3
    stat = data.stat()
    data.write_text('{"text": "two"}\n')  # the same size
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**6))  # a millisecond later
    rewritten = key()
    (folder / "data-00000-of-00001.arrow").write_bytes(b"")
    added = key()
    moved = tmp_path / "b.jsonl"
    data.rename(moved)
    sources[0] = str(moved)
    os.utime(moved, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**6))
    assert len({first, rewritten, added, key()}) == 4


def test_every_format_gets_a_new_cache_key_under_each_new_rule(formats, tokenizer, monkeypatch):
    """A new reading rule or a new tokenisation rule gives every data file, of each format and compression, a new
    token cache key (and so a new stream index key): its tokens are made again under the new rule."""
    def keys() -> dict:
        return {name: token_cache.cache_key([path], tokenizer, "text") for name, path in formats.items()}

    now = keys()
    assert len(set(now.values())) == len(formats)
    for version in ("READING_RULE_VERSION", "TOKENIZATION_RULE_VERSION"):
        monkeypatch.setattr(token_cache, version, getattr(token_cache, version) + 1)
        changed = keys()
        monkeypatch.undo()
        assert all(changed[name] != now[name] for name in formats), version
    assert keys() == now

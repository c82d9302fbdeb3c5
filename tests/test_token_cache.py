"""The token cache (`patch_training.token_cache`): it holds exactly what the tokenizer makes of each document
(any change of the tokenizer, the text column or our rule gives a new cache; reloading the same tokenizer does
not), document boundaries are exactly one EOS whatever the tokenizer does by itself, and two nodes sharing the
cache folder tokenise once."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import DATA_DIR, REPO_ROOT, TOKENIZER_DIR

from patch_training.cli import UsageError
from patch_training.readers import DataSource
from patch_training.token_cache import cache_key, cached_token_stream, tokenize_to_cache
from patch_training.training_args import RunTrainingArguments

TEXTS = ["The first document.", "A second one, a little longer than the first.", "3", "Ünïcödé and </s> as <doc> text"]


def llama(**kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), **kwargs)


def with_post_processor(template: str):
    """The LLaMA-2 tokenizer with another post-processor ("$A": no BOS; "<s> $A </s>": BOS and EOS)."""
    from tokenizers import processors

    tokenizer = llama()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", 1), ("</s>", 2)])
    return tokenizer


def tiny_word_level(eos: str | None):
    """A WordLevel tokenizer built here (no BOS; an EOS token only if `eos`), like GPT-NeoX/Qwen-style ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in TEXTS for w in t.split()})
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token=eos)


def variants() -> dict:
    """Tokenizers with the LLaMA-2 vocabulary that turn (some) texts into other tokens."""
    from tokenizers import normalizers

    lower = llama()
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    special = llama()
    special.add_special_tokens({"additional_special_tokens": ["<doc>"]})
    other_eos = llama()
    other_eos.eos_token = "<unk>"
    return {
        "llama": llama(), "no_bos": with_post_processor("$A"), "bos_eos": with_post_processor("<s> $A </s>"),
        "add_eos_token": llama(add_eos_token=True), "lowercase": lower, "special_token": special, "other_eos": other_eos,
    }


def write_documents(path, texts=TEXTS):
    path.write_text("".join(json.dumps({"text": t, "body": t.upper()}) + "\n" for t in texts))
    return str(path)


def test_every_tokenizer_change_gives_a_new_cache_and_reloading_does_not(tmp_path):
    """The kind of the BOS bug (two tokenizers with one vocabulary but different post-processors shared one cache
    entry): every change of what tokens a document becomes gives a new key, the text column too; the same
    tokenizer loaded again, or saved and loaded from another folder, gives the same key."""
    data = [write_documents(tmp_path / "docs.jsonl")]
    tokenizers = variants()
    keys = {name: cache_key(data, tok, "text") for name, tok in tokenizers.items()}
    assert len(set(keys.values())) == len(keys), keys
    assert cache_key(data, tokenizers["llama"], "body") != keys["llama"]
    assert cache_key(data, llama(), "text") == keys["llama"]
    tokenizers["llama"].save_pretrained(tmp_path / "copy")
    from transformers import AutoTokenizer

    assert cache_key(data, AutoTokenizer.from_pretrained(str(tmp_path / "copy")), "text") == keys["llama"]
    # and each variant's tokens really differ from LLaMA's on these texts
    streams = {name: [tok(t)["input_ids"] for t in TEXTS] for name, tok in tokenizers.items()}
    assert all(streams[name] != streams["llama"] for name in streams if name not in ("llama", "other_eos"))


def test_cached_streams_of_two_post_processors_differ(tmp_path):
    """Regression guard: a second tokenizer never silently reads the first one's cache (BOS included)."""
    source = DataSource.from_files(write_documents(tmp_path / "docs.jsonl"), "train_file")
    args = RunTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    with_bos, folder_a = cached_token_stream(source, llama(), args, cache_dir=str(tmp_path / "cache"))
    without, folder_b = cached_token_stream(source, with_post_processor("$A"), args, cache_dir=str(tmp_path / "cache"))
    assert folder_a != folder_b
    assert int((with_bos == 1).sum()) == len(TEXTS) and int((without == 1).sum()) == 0
    assert len(with_bos) - len(without) == len(TEXTS)


@pytest.mark.parametrize("style", ["llama", "no_bos", "bos_eos", "add_eos_token", "word_level"])
def test_one_eos_per_document_whatever_the_tokenizer_does(style, tmp_path):
    """Document boundaries are exactly one EOS: the tokenizer's own output (with its BOS rule) then EOS, never a
    second EOS from a tokenizer that appends one itself. Compared with per-document encoding by hand."""
    tokenizer = tiny_word_level("</s>") if style == "word_level" else variants()[style]
    eos = tokenizer.eos_token_id
    expected = []
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        expected += ids if ids and ids[-1] == eos and style in ("bos_eos", "add_eos_token") else ids + [eos]
    tokenize_to_cache(None, tokenizer, "text", 3, str(tmp_path / "c"),
                      source=DataSource.from_files(write_documents(tmp_path / "d.jsonl"), "train_file"))
    stream = np.fromfile(tmp_path / "c" / "tokens.bin", dtype=np.uint16).tolist()
    assert stream == expected
    plain_eos = sum(tokenizer(t, add_special_tokens=False)["input_ids"].count(eos) for t in TEXTS)
    assert stream.count(eos) == len(TEXTS) + plain_eos  # "</s>" written in a text is the text's, not a boundary
    assert stream[-1] == eos and stream[-2] != eos


def test_a_tokenizer_without_eos_is_refused(tmp_path):
    with pytest.raises(UsageError, match="has no EOS token, which marks each document's end"):
        tokenize_to_cache(None, tiny_word_level(None), "text", 3, str(tmp_path / "c"),
                          source=DataSource.from_files(write_documents(tmp_path / "d.jsonl"), "train_file"))
    assert not list(tmp_path.glob("c*"))


NODE_SCRIPT = """
import hashlib, json, os, sys
sys.path.insert(0, {repo!r})
from transformers import AutoTokenizer
from patch_training import token_cache
from patch_training.readers import DataSource
from patch_training.training_args import RunTrainingArguments

real = token_cache.tokenize_to_cache
def counted(*args, **kwargs):
    with open({counter!r}, "a") as handle:
        handle.write(os.environ["GROUP_RANK"] + "\\n")
    return real(*args, **kwargs)
token_cache.tokenize_to_cache = counted
args = RunTrainingArguments(output_dir={out!r}, report_to="none", use_cpu=True)
stream, folder = token_cache.cached_token_stream(
    DataSource.from_files({data!r}, "train_file"), AutoTokenizer.from_pretrained({tokenizer!r}), args, cache_dir={cache!r})
print("RESULT", json.dumps([os.environ["GROUP_RANK"], folder, hashlib.sha256(stream.tobytes()).hexdigest()]))
"""


def test_two_nodes_share_one_cache_and_tokenise_once(tmp_path):
    """Two "nodes" (torchrun --nnodes 2 --nproc_per_node 1 on this machine, equal local ranks) sharing one cache
    folder: one tokenises, the other waits on the lock and reads the same stream; no temporary folder is left."""
    from test_multiprocess import free_port

    script = tmp_path / "node.py"
    script.write_text(NODE_SCRIPT.format(repo=str(REPO_ROOT), counter=str(tmp_path / "count"), out=str(tmp_path / "out"),
                                         data=str(DATA_DIR / "sample_train.jsonl"), tokenizer=str(TOKENIZER_DIR),
                                         cache=str(tmp_path / "cache")))
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    nodes = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                          "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port, str(script)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(log[-3000:] for log in logs)
    results = [json.loads(line.split("RESULT ", 1)[1]) for log in logs for line in log.splitlines() if "RESULT " in line]
    assert sorted(r[0] for r in results) == ["0", "1"]
    assert len({(r[1], r[2]) for r in results}) == 1, "both nodes read the same cache folder and stream"
    assert len((tmp_path / "count").read_text().split()) == 1, "tokenised once"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name) == []


def test_backend_encoder_equals_the_tokenizer_call(tmp_path):
    """The fast path (`backend_tokenizer.encode_batch`) gives `tokenizer(texts)["input_ids"]` for each style, and
    a tokenizer whose backend truncates goes through `tokenizer()` (which does not truncate unless asked)."""
    from patch_training.token_cache import batch_encoder

    texts = TEXTS + [open(DATA_DIR / "sample_train.jsonl").readline()]
    for name, tokenizer in {**variants(), "word_level": tiny_word_level("</s>")}.items():
        assert batch_encoder(tokenizer)(texts) == tokenizer(texts)["input_ids"], name
    truncating = llama()
    truncating.backend_tokenizer.enable_truncation(8)
    assert batch_encoder(truncating)(texts) == truncating(texts)["input_ids"]
    assert max(map(len, batch_encoder(truncating)(texts))) > 8


def test_a_hub_dataset_is_tokenised_in_parallel_by_shards(tmp_path):
    """A dataset loaded through `datasets.load_dataset` (here a local folder of 3 JSON-lines shards, offline) is
    tokenised by 2 processes, one shard each, into the bytes of one process."""
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for shard in range(3):
        (tmp_path / "hub" / "data" / f"train-{shard}.jsonl").write_text(
            "".join(json.dumps({"text": f"shard {shard} document {i} " + t}) + "\n" for i, t in enumerate(TEXTS)))
    source = DataSource(dataset_name=str(tmp_path / "hub"))
    assert len(source.parts(2)) == 3
    one = tokenize_to_cache(None, llama(), "text", 2, str(tmp_path / "one"), source=source)
    two = tokenize_to_cache(None, llama(), "text", 2, str(tmp_path / "two"), source=source, num_workers=2)
    assert one["num_documents"] == two["num_documents"] == 3 * len(TEXTS) and two["num_parts"] == 3
    assert (tmp_path / "one" / "tokens.bin").read_bytes() == (tmp_path / "two" / "tokens.bin").read_bytes()


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("workers", [1, 2])
def test_one_progress_bar_per_job(tmp_path, capsys, workers, compressed, monkeypatch):
    """`progress=True` shows one bar for the whole job (not one per worker): bytes with a total (so an ETA),
    documents, tokens and tokens/s, at 100% at the end also for compressed files fed to the workers in chunks;
    `progress=False` (another rank, logging off) shows nothing."""
    import gzip

    from patch_training import readers

    monkeypatch.setattr(readers.lines, "CHUNK_BYTES", 500)
    paths = [write_documents(tmp_path / f"d{i}.jsonl", TEXTS * 5) for i in range(3)]
    if compressed:
        for index, path in enumerate(paths):
            paths[index] = path + ".gz"
            with open(path, "rb") as plain, gzip.open(paths[index], "wb") as packed:
                packed.write(plain.read())
    source = DataSource.from_files(",".join(paths), "train_file")
    tokenize_to_cache(None, llama(), "text", 4, str(tmp_path / "quiet"), source=source, num_workers=workers)
    assert capsys.readouterr().err == ""
    meta = tokenize_to_cache(None, llama(), "text", 4, str(tmp_path / "bar"), source=source, num_workers=workers, progress=True)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenising: 100%" in err and "tokenising" not in err.split("\n")[1], err
    assert f"{meta['num_documents']:,} documents, {meta['num_tokens']:,} tokens" in err and "tokens/s" in err


def test_prefetched_keeps_order_raises_where_the_error_is_and_stops_when_closed():
    """`prefetched` yields the items in order; an error of the reader comes after the items before it; a
    consumer that stops early stops the reading thread (and closes the reader) instead of leaving it blocked."""
    import threading

    from patch_training.token_cache import prefetched

    assert list(prefetched(iter(range(1000)), depth=3)) == list(range(1000))

    def failing():
        yield from range(5)
        raise UsageError("data.jsonl, line 6: not valid JSON")

    seen = []
    with pytest.raises(UsageError, match="line 6"):
        for item in prefetched(failing(), 2):
            seen.append(item)
    assert seen == list(range(5))

    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    stream = prefetched(endless(), depth=2)
    assert [next(stream) for _ in range(10)] == list(range(10))
    stream.close()
    assert closed.wait(5) and not any(t.name == "prefetch-documents" for t in threading.enumerate())


@pytest.mark.parametrize("workers", [1, 2])
def test_null_and_empty_texts_are_skipped_and_counted(tmp_path, caplog, workers, monkeypatch):
    """Regression guard: null and empty texts (JSON null or "", Parquet nulls) are not dropped without a word. They
    are skipped (no tokens), but counted in meta.json's `num_skipped_empty` and in the "Tokenised" line, read
    by one process or by 2 (byte ranges, row groups, a compressed file fed in chunks); a whitespace text is
    tokenised; a meta.json without the count reports nothing."""
    import gzip
    import logging

    import pyarrow as pa
    import pyarrow.parquet as pq

    from patch_training import readers
    from patch_training.token_cache import skipped_note

    monkeypatch.setattr(readers.lines, "CHUNK_BYTES", 200)
    monkeypatch.setattr(readers.parts, "PART_BYTES", 300)
    records = [{"text": t} for t in TEXTS * 3] + [{"text": None}, {"text": ""}, {"text": " "}, {"text": None, "id": 1}]
    records = records[::2] + records[1::2]  # the nulls and empties in several parts
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    packed = tmp_path / "b.jsonl.gz"
    packed.write_bytes(gzip.compress(jsonl.read_bytes()))
    table = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [None, "Row one.", "", None, "Row four."]}), table, row_group_size=2)
    expected = {str(jsonl): (13, 3), str(packed): (13, 3), str(table): (2, 3)}  # (documents, skipped)
    for path, (documents, skipped) in expected.items():
        meta = tokenize_to_cache(None, llama(), "text", 2, str(tmp_path / f"{workers}-{os.path.basename(path)}"),
                                 source=DataSource.from_files(path, "train_file"), num_workers=workers)
        assert (meta["num_documents"], meta["num_skipped_empty"]) == (documents, skipped), path
    assert workers == 1 or meta["num_jobs"] == 3
    args = RunTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    source = DataSource.from_files(",".join(expected), "train_file")
    with caplog.at_level(logging.INFO, logger="run_clm"):
        cached_token_stream(source, llama(), args, cache_dir=str(tmp_path / "cache"), batch_size=3, num_workers=workers)
    assert any(r.getMessage().startswith("Tokenised 28 documents (9 null or empty texts skipped) into ")
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert skipped_note({"num_skipped_empty": 1}) == " (1 null or empty text skipped)"
    assert skipped_note({"num_documents": 3}) == skipped_note({"num_skipped_empty": 0}) == ""


def test_a_text_the_tokenizer_refuses_is_one_line():
    """Documents not read by our readers (a hub dataset) are checked where the tokenizer refuses a batch: a lone
    surrogate or a value that is not text is one line, not the tokenizer's TypeError."""
    from patch_training.token_cache import iter_document_tokens

    for text, message in (("bad \ud800 one", r"its 'text' holds a lone surrogate \(\\ud800 at character 5\), not valid Unicode"),
                          (5, "its 'text' is an int, not text"), (0.5, "its 'text' is a float, not text"),
                          (["a"], "its 'text' is a list, not text"), ({"a": 1}, "its 'text' is a dict, not text"),
                          (b"x", "its 'text' is a bytes, not text"), (object(), "its 'text' is an object, not text")):
        with pytest.raises(UsageError, match=rf"^a document of the data: {message}$"):
            list(iter_document_tokens([{"text": "fine"}, {"text": text}], llama(), "text", 4))


# ---------------------------------------------------------------------------------------------------------
# Temporary folders left by killed tokenisations
# ---------------------------------------------------------------------------------------------------------

KILLED_SCRIPT = """
import os, sys, time
sys.path.insert(0, {repo!r})
from transformers import AutoTokenizer
from patch_training import token_cache
from patch_training.readers import DataSource
from patch_training.training_args import RunTrainingArguments

def hanging(job):  # a worker: half its part file written, then a long tokenisation
    with open(job[-1], "wb") as handle:
        handle.write(bytes(3000))
    open(os.path.join({ready!r}, str(os.getpid())), "w").close()
    time.sleep(600)

token_cache._tokenize_part = hanging
args = RunTrainingArguments(output_dir={out!r}, report_to="none", use_cpu=True)
token_cache.cached_token_stream(DataSource.from_files({data!r}, "train_file"), AutoTokenizer.from_pretrained({tokenizer!r}),
                                args, cache_dir={cache!r}, num_workers=2)
"""


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl(PR_SET_PDEATHSIG): Linux")
def test_a_tokenisation_killed_with_sigkill_leaves_nothing_behind(tmp_path, caplog):
    """Regression guard: `kill -9` of a tokenising process (preemption, the OOM killer) must not leave its temporary
    folder `<key>.tmp-<host>-<pid>-<hex>` in the cache folder forever (at Pile scale hundreds of GB), nor its worker
    processes running forever. A real tokenisation by 2 worker processes, killed with SIGKILL while the workers
    write their part files: the workers die with it, and the next run (which takes the key's lock) removes the
    folder, named with its size in one log line, then tokenises as usual; nothing else in the cache folder is
    touched."""
    import logging
    import signal
    import time

    data = ",".join(write_documents(tmp_path / f"d{i}.jsonl", TEXTS * 3) for i in range(2))
    cache, ready = tmp_path / "cache", tmp_path / "ready"
    cache.mkdir()
    ready.mkdir()
    (cache / "notes.txt").write_text("mine\n")
    script = tmp_path / "killed.py"
    script.write_text(KILLED_SCRIPT.format(repo=str(REPO_ROOT), ready=str(ready), out=str(tmp_path / "out"), data=data,
                                           tokenizer=str(TOKENIZER_DIR), cache=str(cache)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    main = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    workers = []
    try:
        deadline = time.time() + 120
        while len(os.listdir(ready)) < 2 and main.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        workers = [int(name) for name in os.listdir(ready)]
        assert len(workers) == 2, main.communicate(timeout=60)[0][-3000:] if main.poll() is not None else "no workers"
        main.send_signal(signal.SIGKILL)
        main.wait(timeout=60)
        deadline = time.time() + 20
        while any(map(alive, workers)) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(map(alive, workers)), "the workers of a killed tokenisation keep running"
    finally:
        for pid in [main.pid] * (main.poll() is None) + [pid for pid in workers if alive(pid)]:
            os.kill(pid, signal.SIGKILL)
    [temporary] = [p for p in cache.iterdir() if ".tmp-" in p.name]
    size = sum(f.stat().st_size for f in temporary.iterdir())
    assert size == 6000 and temporary.name.startswith(f"{temporary.name[:20]}.tmp-")
    args = RunTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    with caplog.at_level(logging.INFO, logger="run_clm"):
        stream, folder = cached_token_stream(DataSource.from_files(data, "train_file"), llama(), args,
                                             cache_dir=str(cache), num_workers=2)
    assert f"Removed 1 stale temporary folder left by a killed tokenisation from {cache} (6.00kB): {temporary.name} " \
           "(6.00kB)" in [r.getMessage() for r in caplog.records]
    assert sorted(p.name for p in cache.iterdir()) == sorted([os.path.basename(folder), f"{os.path.basename(folder)}.lock",
                                                              "notes.txt"])
    assert temporary.name.startswith(os.path.basename(folder)) and (cache / "notes.txt").read_text() == "mine\n"
    assert len(stream) == json.loads((cache / os.path.basename(folder) / "meta.json").read_text())["num_tokens"] > 0
    assert not any(r.levelname == "WARNING" for r in caplog.records)


def test_stale_temporaries_are_removed_only_when_provably_abandoned(tmp_path, caplog):
    """The class of the fault, with fabricated folders beside a real tokenisation: a temporary folder (the name
    `temporary_name` gives, files a tokenisation writes) is removed when its key's lock is free: this key's under
    its lock before tokenising, another key's when its lock file can be taken at once (also on a later run that
    only reads the cache). Kept: another key's whose lock is held (being written: silently), one without a lock
    file or holding a file a tokenisation does not write (one warning naming them). Never touched: caches, locks,
    other files, names not of the pattern, a link with a temporary's name and what it points to."""
    import logging

    from filelock import FileLock

    from patch_training.token_cache import TEMPORARY_NAME, temporary_name

    source = DataSource.from_files(write_documents(tmp_path / "d.jsonl"), "train_file")
    key = cache_key(source.names, llama(), "text")
    cache = tmp_path / "cache"
    cache.mkdir()

    def folder(name, files=("tokens.bin", "part-000003.bin"), lock=True):
        (cache / name).mkdir()
        for index, file in enumerate(files):
            (cache / name / file).write_bytes(bytes(1000 * (index + 1)))
        if lock:
            (cache / f"{name[:20]}.lock").touch()
        return name

    own = folder(os.path.basename(temporary_name(str(cache / key))))  # this host, this pid: a killed earlier run
    other = folder("a" * 20 + ".tmp-node-07.cluster-4242-0123abcd")
    held = folder("b" * 20 + ".tmp-node-07-17-89abcdef")
    lockless = folder("c" * 20 + ".tmp-node-3-99-00000000", lock=False)
    foreign = folder("d" * 20 + ".tmp-node-3-98-00000001", ("tokens.bin", "notes.txt"))
    untouched = {
        "e" * 20 + "/tokens.bin": b"a cache", "e" * 20 + "/meta.json": b"{}", "e" * 20 + ".lock": b"",
        "notes.txt": b"mine", "a" * 20 + ".tmp-bad/tokens.bin": b"1", "f" * 19 + ".tmp-h-1-00000000/tokens.bin": b"2",
        "a" * 20 + ".tmp-h-1-0000000g/tokens.bin": b"3", "target/tokens.bin": b"4", "9" * 20 + ".lock": b"",
    }
    for name, content in untouched.items():
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / name).write_bytes(content)
    (cache / ("9" * 20 + ".tmp-h-5-00000002")).symlink_to(cache / "target")
    assert all(TEMPORARY_NAME.fullmatch(name) for name in (own, other, held, lockless, foreign))
    args = RunTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    holder = FileLock(str(cache / f"{held[:20]}.lock"), timeout=0)
    holder.acquire()  # another process tokenising that key (flock: another open file is another owner)
    try:
        with caplog.at_level(logging.INFO, logger="run_clm"):
            cached_token_stream(source, llama(), args, cache_dir=str(cache))
    finally:
        holder.release()
    messages = [(r.levelname, r.getMessage()) for r in caplog.records if "temporary folder" in r.getMessage()]
    assert messages == [
        ("INFO", f"Removed 2 stale temporary folders left by killed tokenisations from {cache} (6.00kB in all): "
                 + ", ".join(f"{name} (3.00kB)" for name in sorted([other, own]))),  # by key: own's is a hash
        ("WARNING", f"Kept 2 temporary folders in the token cache folder {cache} that may still be in use (remove them "
                    f"by hand once no tokenisation is writing them): {lockless} (3.00kB; no {lockless[:20]}.lock beside "
                    f"it), {foreign} (3.00kB; holds notes.txt, which a tokenisation does not write)")], messages
    assert not (cache / own).exists() and not (cache / other).exists()
    assert all((cache / name).is_dir() for name in (held, lockless, foreign))
    assert all((cache / name).read_bytes() == content for name, content in untouched.items())
    assert (cache / ("9" * 20 + ".tmp-h-5-00000002")).is_symlink()

    caplog.clear()  # the held lock is free now: a run that only reads the cache removes that temporary
    with caplog.at_level(logging.INFO, logger="run_clm"):
        cached_token_stream(source, llama(), args, cache_dir=str(cache))
    messages = [r.getMessage() for r in caplog.records if "temporary folder" in r.getMessage()]
    assert messages[0] == f"Removed 1 stale temporary folder left by a killed tokenisation from {cache} (3.00kB): {held} (3.00kB)"
    assert messages[1].startswith("Kept 2 temporary folders") and len(messages) == 2
    assert not (cache / held).exists() and (cache / lockless).is_dir() and (cache / foreign / "notes.txt").exists()
    assert all((cache / name).read_bytes() == content for name, content in untouched.items())

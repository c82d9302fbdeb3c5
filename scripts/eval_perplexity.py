#!/usr/bin/env python
"""Perplexity of a causal LM on WikiText-103 test at document level (the paper's perplexity set).

Works on any folder this project writes (the final model, `patch_stage/`, a `checkpoint-*`) and on any stock
Hugging Face causal LM folder: it loads `AutoModelForCausalLM` and `AutoTokenizer`, offline, with no import
of the project's model code. A `patch_size` in the config is ignored: the evaluation is token-level.

The text is read exactly as `run_clm.py` reads its validation set, by the same function
(`patch_training.token_cache.iter_document_tokens`), so the two cannot drift apart:

1. each non-empty document is tokenised as `tokenizer(text, add_special_tokens=True) + [EOS]`
   (for LLaMA: BOS, the text, EOS);
2. the documents are concatenated into one stream of n tokens;
3. only the first N*T tokens are evaluated, N = floor(n / T) (capped by --max_blocks): the final partial
   block is dropped.

`--protocol blocks` (default; `run_clm.py`'s in-training evaluation, so the numbers agree): N
non-overlapping blocks of T tokens, each a sequence of its own; every token of a block but the first is
scored given the tokens before it in the block, N*(T-1) tokens in all.

`--protocol sliding --stride S` (Hugging Face's sliding-window recipe): windows of T tokens start every S
tokens over the same N*T tokens; each window scores only the tokens that no earlier window scored, so every
token but the very first is scored exactly once, with at least T - S tokens of context (fewer only in the
first window). S = T is the blocks protocol. Smaller S: more context per token, more compute (about T/S
times that of blocks).

perplexity = exp(sum of the negative log-likelihoods / number of scored tokens), in nats, float32 logits.

    python scripts/eval_perplexity.py --model runs/llama-370m-patch-k4-lambda0.67 --output_json outputs/eval/ppl.json
    python scripts/eval_perplexity.py --model runs/llama-370m-patch-k4-lambda0.67 --protocol sliding --stride 512
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from patch_training.cli import UsageError, file_in_the_way, first_line, run_cli  # noqa: E402
from patch_training.readers import DataSource  # noqa: E402  (the same reading and tokenisation as run_clm.py)
from patch_training.token_cache import iter_document_tokens  # noqa: E402

DEFAULT_DATA = REPO_ROOT / "data" / "wikitext-103-test.jsonl"
MAX_DEFAULT_BLOCK_SIZE = 2048
PROTOCOLS = ("blocks", "sliding")
TOKENISATION = "tokenizer(text, add_special_tokens=True) + [EOS] per non-empty document, documents concatenated"


@dataclass(frozen=True)
class Window:
    """One model input: stream tokens [begin, end); its last `num_targets` tokens are scored."""

    begin: int
    end: int
    num_targets: int

    @property
    def length(self) -> int:
        return self.end - self.begin


def plan_windows(num_tokens: int, block_size: int, protocol: str = "blocks", stride: int | None = None) -> list[Window]:
    """The windows of a protocol over a stream of `num_tokens` tokens (a multiple of `block_size` T).

    blocks: [jT, (j+1)T), scoring its last T-1 tokens. sliding: [iS, min(iS+T, n)), scoring the tokens past
    the previous window's end (and never token 0, which has no context)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if block_size < 2:
        raise ValueError(f"block_size T must be >= 2 (a block of 1 token scores nothing), got {block_size}")
    if num_tokens % block_size:
        raise ValueError(f"{num_tokens} tokens is not a whole number of blocks of {block_size}")
    if protocol == "blocks":
        return [Window(begin, begin + block_size, block_size - 1) for begin in range(0, num_tokens, block_size)]
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride S must lie in [1, T={block_size}], got {stride}")
    windows, scored_until = [], 0  # tokens [0, scored_until) are scored (or are token 0)
    for begin in range(0, num_tokens, stride):
        end = min(begin + block_size, num_tokens)
        first_target = max(scored_until, begin + 1)
        windows.append(Window(begin, end, end - first_target))
        scored_until = end
        if end == num_tokens:
            break
    return windows


def _batches(windows: list[Window], batch_size: int):
    """Consecutive windows of equal length, at most `batch_size` at a time (one tensor each)."""
    batch: list[Window] = []
    for window in windows:
        if batch and (len(batch) == batch_size or window.length != batch[0].length):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


@torch.no_grad()
def evaluate_perplexity(
    model,
    token_ids,
    block_size: int,
    batch_size: int = 1,
    protocol: str = "blocks",
    stride: int | None = None,
    max_blocks: int | None = None,
    progress: bool = False,
) -> dict:
    """Perplexity of `model` (a causal LM returning `.logits`) on a token stream, by `protocol` (see the
    module docstring). The stream is cut to its first N*T tokens, N = floor(len / T), at most `max_blocks`.

    Returns blocks, evaluated_tokens (N*T), windows, scored_tokens, nll_sum, mean_nll and perplexity."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
    num_blocks = len(ids) // block_size
    if max_blocks is not None:
        num_blocks = min(num_blocks, max_blocks)
    if num_blocks == 0:
        raise ValueError(f"{len(ids)} tokens make no block of T={block_size}")
    ids = ids[: num_blocks * block_size]
    windows = plan_windows(len(ids), block_size, protocol, stride)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    nll_sum, scored = 0.0, 0
    bar = _progress_bar(len(windows), f"{protocol} T={block_size}", progress)
    try:
        for batch in _batches(windows, batch_size):
            inputs = torch.stack([ids[w.begin : w.end] for w in batch]).to(device)  # (B, L)
            keep = max(w.num_targets for w in batch) + 1  # logits of the positions that predict targets
            kwargs = {"logits_to_keep": keep} if keep_logits else {}
            logits = model(input_ids=inputs, use_cache=False, **kwargs).logits  # (B, keep or L, V)
            for row, window in enumerate(batch):
                n = window.num_targets
                if n == 0:
                    continue
                predictors = logits[row, -n - 1 : -1].float()  # (n, V): positions end-n-1 .. end-2
                targets = inputs[row, -n:]  # (n,): stream tokens end-n .. end-1
                nll_sum += F.cross_entropy(predictors, targets, reduction="sum").item()
                scored += n
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)

    mean_nll = nll_sum / scored
    return {
        "protocol": protocol,
        "block_size": block_size,
        "stride": (stride or block_size) if protocol == "sliding" else block_size,
        "blocks": num_blocks,
        "evaluated_tokens": len(ids),
        "windows": len(windows),
        "scored_tokens": scored,
        "nll_sum": nll_sum,
        "mean_nll": mean_nll,
        "perplexity": math.exp(mean_nll) if mean_nll < 700 else float("inf"),
    }


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not enabled)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def read_token_stream(data: str, tokenizer, text_column: str = "text", batch_size: int = 1000) -> tuple[np.ndarray, int]:
    """(token stream, number of documents) of a .jsonl/.json/.txt file, read and tokenised as run_clm does."""
    documents = DataSource.from_files(data, "data", text_column).documents()
    pieces = list(iter_document_tokens(documents, tokenizer, text_column, batch_size))
    stream = np.fromiter((t for piece in pieces for t in piece), dtype=np.int64)
    return stream, len(pieces)


def protocol_statement(result: dict, num_documents: int, stream_tokens: int) -> str:
    """One paragraph saying exactly what was scored."""
    t, n, evaluated = result["block_size"], result["blocks"], result["evaluated_tokens"]
    head = (
        f"{num_documents} documents, {TOKENISATION}: {stream_tokens} tokens; the first {evaluated} "
        f"(= {n} x T={t}) evaluated, {stream_tokens - evaluated} dropped"
    )
    if result["protocol"] == "blocks":
        body = f"protocol blocks: {n} non-overlapping blocks of T={t}, each scored on its last {t - 1} tokens"
    else:
        s = result["stride"]
        body = (
            f"protocol sliding: {result['windows']} windows of up to T={t} tokens every S={s} tokens, each token "
            f"but the first scored once with >= {t - s} tokens of context (fewer in the first window)"
            if s < t
            else f"protocol sliding with S = T={t}: the blocks protocol ({n} blocks, each scored on its last {t - 1} tokens)"
        )
    return f"{head}; {body}; {result['scored_tokens']} scored tokens"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A model folder (this project's output or any HF causal LM).")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer folder (default: the model folder).")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="Documents (.jsonl/.json/.txt; default: WikiText-103 test).")
    parser.add_argument("--text_column", "--text_column_name", default="text", help="The JSON key holding each document's text.")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="blocks", help="blocks (run_clm's) or sliding.")
    parser.add_argument("--stride", type=int, default=None, help="Sliding-window stride S (default T/2).")
    parser.add_argument(
        "--block_size", type=int, default=None,
        help=f"T, tokens per sequence (default: min(max_position_embeddings, {MAX_DEFAULT_BLOCK_SIZE})).",
    )
    parser.add_argument("--max_blocks", type=int, default=None, help="Evaluate only the first N blocks (quick checks).")
    parser.add_argument("--batch_size", type=int, default=1, help="Sequences per forward pass.")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="Weights' dtype.")
    parser.add_argument("--output_json", default=None, help="Write the result and its protocol here.")
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")
    args = parser.parse_args(argv)
    if args.max_blocks is not None and args.max_blocks < 1:
        parser.error(f"--max_blocks must be >= 1, got {args.max_blocks}")
    if args.stride is not None and args.protocol != "sliding":
        parser.error("--stride needs --protocol sliding")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.block_size is not None and args.block_size < 2:
        parser.error(f"--block_size must be >= 2 (a block of 1 token scores nothing), got {args.block_size}")
    if args.stride is not None and args.stride < 1:
        parser.error(f"--stride must be >= 1, got {args.stride}")
    for name, folder in (("model", args.model), ("tokenizer", args.tokenizer)):
        if folder is not None and not Path(folder).is_dir():
            parser.error(f"--{name} {folder}: no such folder (a local folder: nothing is downloaded)")
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json in it, so no model to load")
    if args.output_json is not None:  # checked now: the evaluation can take a while
        output = Path(args.output_json)
        if output.is_dir():
            parser.error(f"--output_json {args.output_json} is a folder; give a file path to write the result to")
        blocking = file_in_the_way(output.parent)
        if blocking is not None:
            parser.error(f"--output_json {args.output_json}: {blocking} is not a folder (a file, or a link to nothing)")
        problem = output_problem(output, args)
        if problem:
            parser.error(f"--output_json {args.output_json} {problem}")
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError as error:
            parser.error(f"--device {args.device}: {error}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: torch sees no CUDA GPU here (use cpu or auto)")
    return args


def output_problem(output: Path, args) -> str | None:
    """Why the result may not be written to `output`, or None: it is an input of this evaluation (the --data file,
    a file of the --model or --tokenizer folder, through links too), or an existing file that is not an earlier
    result of this script (a JSON object with its "perplexity" and "protocol"): writing would destroy it."""
    resolved = output.resolve()
    if args.data and Path(args.data).exists() and resolved == Path(args.data).resolve():
        return "is the --data file: writing the result would replace the data"
    for name, folder in (("--model", args.model), ("--tokenizer", args.tokenizer)):
        if folder and Path(folder).resolve() in resolved.parents:
            return f"lies in the {name} folder {folder}: writing the result there could replace its files"
    if output.exists():
        try:
            earlier = json.loads(output.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and {"perplexity", "protocol"} <= set(earlier)):
            return "is a file this script did not write (not an earlier result): choose another path"
    return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoConfig, AutoModelForCausalLM

    from patch_training.models import check_tokenizer_fits_model, load_tokenizer

    config = AutoConfig.from_pretrained(args.model)
    max_positions = getattr(config, "max_position_embeddings", None) or MAX_DEFAULT_BLOCK_SIZE
    block_size = args.block_size or min(max_positions, MAX_DEFAULT_BLOCK_SIZE)
    if block_size > max_positions:
        raise UsageError(f"--block_size {block_size} exceeds the model's context {max_positions}")
    stride = (args.stride or max(1, block_size // 2)) if args.protocol == "sliding" else None
    if stride is not None and not 1 <= stride <= block_size:
        raise UsageError(f"--stride must lie in [1, T={block_size}], got {stride}")

    tokenizer_path = args.tokenizer or args.model
    tokenizer = load_tokenizer(tokenizer_path, "--tokenizer" if args.tokenizer else "--model")  # UsageError: one line
    if args.tokenizer:
        check_tokenizer_fits_model(tokenizer, f"--tokenizer {args.tokenizer}", config, args.model, "--model")
    else:
        check_tokenizer_fits_model(tokenizer, f"the tokenizer in --model {args.model}", config)
    stream, num_documents = read_token_stream(args.data, tokenizer, args.text_column)
    if len(stream) < block_size:
        raise UsageError(f"--data {args.data} holds {len(stream)} tokens, fewer than one block of T={block_size}")

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=str(device))
    except OSError as error:  # a config without weights, say
        raise UsageError(f"--model {args.model}: {first_line(error)}") from None
    print(f"[eval_perplexity] model {args.model} ({type(model).__name__}, {args.dtype}, {device}); tokenizer {tokenizer_path}", flush=True)

    start = time.time()
    result = evaluate_perplexity(
        model, stream, block_size, args.batch_size, args.protocol, stride, args.max_blocks, progress=not args.no_progress
    )
    result.update(
        model=args.model, tokenizer=tokenizer_path, data=args.data, documents=num_documents, stream_tokens=len(stream),
        tokenisation=TOKENISATION, dtype=args.dtype, device=str(device), runtime_s=round(time.time() - start, 2),
    )
    result["statement"] = protocol_statement(result, num_documents, len(stream))
    print(f"[eval_perplexity] {args.data}: {result['statement']}")
    print(f"[eval_perplexity] perplexity {result['perplexity']:.4f} (mean NLL {result['mean_nll']:.5f} nats/token)", flush=True)
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output_json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")
    return result


def cli() -> None:
    run_cli(main, "eval_perplexity.py")


if __name__ == "__main__":
    cli()

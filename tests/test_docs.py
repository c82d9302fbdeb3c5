"""The code blocks of README.md and docs/*.md run as written, offline; what they name exists.

The conventions (docs/testing.md, "Code blocks in the docs"):
- every fenced block carries a language tag: `bash` and `python` blocks are code, `text`, `json`, `yaml`,
  `toml` and `diff` blocks are not;
- code blocks run in a scratch copy of the repository (its files linked, its own runs/ and outputs/, its own
  token cache), one process per block, in the order of the page; `runs/tiny-patch` is there already, made
  once by the README's quick-start command;
- a code block that cannot run here (GPUs, the hub, hours of work) sits right under a comment
  `<!-- not run: REASON -->`. It is checked instead: the repository files it names exist, and each `--flag` it
  gives run_clm.py or a script of this repository is one that program takes (a Python block must compile).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
SHELL_TAGS = {"bash"}
PYTHON_TAGS = {"python"}
TEXT_TAGS = {"text", "json", "yaml", "toml", "diff"}
NOT_RUN = re.compile(r"^<!--\s*not run:(.*?)-->$")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<tag>[^`\s]*)\s*$")
QUICK_START = "python run_clm.py configs/train/tiny-patch.json"
# Shell scripts whose arguments go to another program: run_clm.py's flags, a Python script's, or none checked
# (None: positional arguments, or flags for a program outside this repository, such as lm_eval).
SHELL_SCRIPT_ARGUMENTS = {
    "scripts/run_paper.sh": "run_clm.py",
    "scripts/launch_accelerate.sh": "run_clm.py",
    "scripts/launch_deepspeed.sh": "run_clm.py",
    "scripts/launch_torchrun.sh": "run_clm.py",
    "scripts/sweep_gpu.sh": "scripts/sweep.py",
    "scripts/compare_gpu.sh": None,
    "scripts/eval_lm_harness.sh": None,
    "benchmarks/gpu_suite.sh": None,
    "benchmarks/prepare_gpu_wheels.sh": None,
}
# Scripts that pass what follows a bare `--` to every run_clm.py run they start.
FORWARD_AFTER_SEPARATOR = {"scripts/replicate.py", "scripts/sweep.py", "scripts/sweep_gpu.sh"}
# Repository paths a block may name before something makes them (prepare_pile.py's downloads and caches).
GENERATED = ("data/pile/", "benchmarks/results/compare-h200")
REPO_PATH = re.compile(
    r"(?<![\w/.$-])((?:configs|scripts|benchmarks|data|docs|tests)/[\w./*{},-]*[\w*}]"
    r"|run_clm\.py|modeling_llama_patch\.py|requirements[\w-]*\.txt)"
)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    tag: str
    code: str
    not_run: str | None  # the reason given in <!-- not run: REASON -->, or None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(REPO_ROOT)}:{self.line}"

    @property
    def is_code(self) -> bool:
        return self.tag in SHELL_TAGS | PYTHON_TAGS


def code_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, dedented (a block may sit in a list item), with the `not run` reason
    of the comment on the line above the fence (blank lines between are allowed)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, start = opening["fence"], i
        end = next((j for j in range(i + 1, len(lines))
                    if lines[j].strip().startswith(fence[0] * len(fence)) and not lines[j].strip().strip(fence[0])),
                   None)
        assert end is not None, f"{page.relative_to(REPO_ROOT)}:{start + 1}: a code block is never closed"
        above = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.match(above)
        code = textwrap.dedent("\n".join(lines[start + 1:end])) + "\n"
        blocks.append(Block(page, start + 1, opening["tag"], code, marker[1].strip() if marker else None))
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in code_blocks(page)]
CODE = [block for block in BLOCKS if block.is_code]
RUN = [block for block in CODE if block.not_run is None]
CHECKED = [block for block in CODE if block.not_run is not None]


def ids(blocks: list[Block]) -> list[str]:
    return [block.name for block in blocks]


# ---------------------------------------------------------------------------------------------------------
# The conventions themselves
# ---------------------------------------------------------------------------------------------------------


def test_every_block_says_what_it_is():
    """An untagged block (or an unknown tag) would be neither run nor checked without anyone deciding so."""
    known = SHELL_TAGS | PYTHON_TAGS | TEXT_TAGS
    unknown = [f"{block.name} ({block.tag or 'no tag'})" for block in BLOCKS if block.tag not in known]
    assert not unknown, f"code blocks without a known language tag ({', '.join(sorted(known))}): {unknown}"


def test_not_run_marks_give_a_reason_and_sit_on_code():
    empty = [block.name for block in CODE if block.not_run == ""]
    assert not empty, f"<!-- not run: --> without a reason above: {empty}"
    on_text = [block.name for block in BLOCKS if not block.is_code and block.not_run is not None]
    assert not on_text, f"<!-- not run: ... --> above a block that is not code (it is never run anyway): {on_text}"
    for page in PAGES:  # a mark that no fence follows (a typo in the fence, a mark left behind) marks nothing
        lines = page.read_text(encoding="utf-8").splitlines()
        inside = {number for block in code_blocks(page) for number in range(block.line, block.line + block.code.count("\n") + 1)}
        for number, line in enumerate(lines):
            if number not in inside and NOT_RUN.match(line.strip()):
                following = next((text for text in lines[number + 1:] if text.strip()), "")
                assert FENCE.match(following), f"{page.relative_to(REPO_ROOT)}:{number + 1}: a not-run mark with no code block under it"


def test_the_pages_parse_into_blocks():
    """The parser finds the README's quick start: a guard against a pattern that silently matches nothing."""
    readme = [block for block in CODE if block.page.name == "README.md"]
    assert any(QUICK_START in block.code for block in readme)
    assert len(RUN) >= 5 and len(CHECKED) >= 5


# ---------------------------------------------------------------------------------------------------------
# Static checks: every code block, run or not
# ---------------------------------------------------------------------------------------------------------


@cache
def program_flags(program: str) -> frozenset[str]:
    """The `--flags` a program of this repository takes, read from its `--help`."""
    done = subprocess.run([sys.executable, program, "--help"], check=False, capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, f"{program} --help failed: {done.stderr[-2000:]}"
    return frozenset(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", done.stdout))


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block as word lists: continuation lines joined, comments dropped, split at
    `&&`, `||`, `;` and `|`."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words, current = shlex.split(line, comments=True), []
        for word in words:
            if word in ("&&", "||", ";", "|"):
                commands.append(current)
                current = []
            else:
                current.append(word)
        commands.append(current)
    return [command for command in commands if command]


def flag_problems(command: list[str]) -> list[str]:
    """The flags of one command that its program (run_clm.py or a script of this repository) does not take."""
    for position, word in enumerate(command):
        if word.endswith((".py", ".sh")) and (REPO_ROOT / word).is_file():
            program = word
            break
    else:
        return []  # not a program of this repository (pip, lm_eval, tensorboard, python -c ...)
    if program.endswith(".sh"):
        assert program in SHELL_SCRIPT_ARGUMENTS, f"add {program} to SHELL_SCRIPT_ARGUMENTS in tests/test_docs.py"
        target = SHELL_SCRIPT_ARGUMENTS[program]
    else:
        target = program
    problems = []
    for word in command[position + 1:]:
        if word == "--":
            target = "run_clm.py" if program in FORWARD_AFTER_SEPARATOR else None
        elif target and re.fullmatch(r"--[A-Za-z][\w-]*(=.*)?", word):
            flag = word.split("=", 1)[0]
            if flag not in program_flags(target):
                problems.append(f"{flag} (not an argument of {target})")
    return problems


@pytest.mark.parametrize("block", CODE, ids=ids(CODE))
def test_block_names_what_exists(block):
    """The repository files a block names exist, and the flags it gives this repository's programs are theirs
    (run_clm.py takes no abbreviation of a flag)."""
    named = {path.rstrip(".,") for path in REPO_PATH.findall(block.code)}
    missing = sorted(path for path in named if not any(c in path for c in "*{") and not path.startswith(GENERATED)
                     and not (REPO_ROOT / path).exists())
    assert not missing, f"{block.name} names files that do not exist: {missing}"
    if block.tag in PYTHON_TAGS:
        compile(block.code, block.name, "exec")
        return
    problems = [problem for command in shell_commands(block.code) for problem in flag_problems(command)]
    assert not problems, f"{block.name}: {problems}"


# ---------------------------------------------------------------------------------------------------------
# Running the blocks
# ---------------------------------------------------------------------------------------------------------

SKIP_LINKS = {".git", ".venv", "runs", "outputs", ".pytest_cache", ".cache", "__pycache__"}


@pytest.fixture(scope="session")
def docs_root(tmp_path_factory):
    """A scratch repository: every top-level entry linked, but runs/, outputs/ and the token cache its own."""
    root = tmp_path_factory.mktemp("docs_root") / REPO_ROOT.name
    root.mkdir()
    # the data the pages name as ../shared/data, beside the repository as in a checkout
    (root.parent / "shared").symlink_to(REPO_ROOT.parent / "shared")
    for entry in REPO_ROOT.iterdir():
        if entry.name not in SKIP_LINKS:
            (root / entry.name).symlink_to(entry)
    return root


def block_env(root: Path) -> dict:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # `python` is this interpreter
        "HF_HOME": str(root / ".hf_home"),  # run_clm.py's default token cache lies under it
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "MPLBACKEND": "Agg",
    }


def run_block(block: Block, root: Path) -> subprocess.CompletedProcess:
    """A Python block as `python -c` (the current folder on sys.path, as in a shell at the repository root), a
    shell block as a bash script that stops at the first failing command."""
    if block.tag in PYTHON_TAGS:
        command = [sys.executable, "-c", block.code]
    else:
        command = ["bash", "-eo", "pipefail", "-c", block.code]
    return subprocess.run(command, check=False, capture_output=True, text=True, cwd=root, env=block_env(root), timeout=900,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def quick_start_run(docs_root):
    """runs/tiny-patch in the scratch repository, made by the README's quick-start command (about a minute)."""
    done = subprocess.run(shlex.split(QUICK_START), check=False, capture_output=True, text=True, cwd=docs_root,
                          env=block_env(docs_root), timeout=1800)
    assert done.returncode == 0, f"{QUICK_START} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert (docs_root / "runs" / "tiny-patch" / "all_results.json").is_file()
    return docs_root


@pytest.mark.parametrize("block", RUN, ids=ids(RUN))
def test_block_runs(block, request):
    """Each block that is not marked `not run` runs as written and exits 0."""
    needs_quick_start = "runs/tiny-patch" in block.code or QUICK_START in block.code
    root = request.getfixturevalue("quick_start_run" if needs_quick_start else "docs_root")
    done = run_block(block, root)
    assert done.returncode == 0, (
        f"{block.name} failed (exit {done.returncode}):\n{block.code}\n--- stdout\n{done.stdout[-3000:]}"
        f"\n--- stderr\n{done.stderr[-5000:]}"
    )


# ---------------------------------------------------------------------------------------------------------
# Links and hygiene
# ---------------------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# Pages that other branches write; a link to one is allowed before that branch is merged, and checked after.
WRITTEN_ELSEWHERE: set[str] = set()  # pages linked before they are written (none)


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens, -1, -2 ... for
    repeats. Headings inside code blocks are not headings."""
    anchors, seen, in_code = set(), {}, False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and (heading := re.match(r"#{1,6} +(.*?) *#* *$", line)):
            slug = re.sub(r"[^\w\- ]", "", heading[1].lower()).replace(" ", "-")
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(REPO_ROOT)) for page in PAGES])
def test_links_lead_somewhere(page):
    """Each relative link names a file of the repository, and each #anchor a heading of its page."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        relative = os.path.relpath(file, REPO_ROOT)
        if not file.exists():
            if relative not in WRITTEN_ELSEWHERE:
                broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO_ROOT)}: links to nothing: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(REPO_ROOT)) for page in PAGES])
def test_no_commit_hashes_or_issue_numbers(page):
    """The docs describe the project as it is: a commit hash or an internal issue number means nothing to a
    reader (the history is in git)."""
    text = page.read_text(encoding="utf-8")
    hashes = re.findall(r"(?<![\w./-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w-])", text)
    issues = re.findall(r"\bissues? +#?\d+", text, flags=re.IGNORECASE)
    assert not hashes and not issues, f"{page.relative_to(REPO_ROOT)}: {hashes + issues}"

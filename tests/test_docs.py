"""Documentation that cannot rot: every Python block of the README and of docs/ runs on the tiny models
(a block that needs real weights follows a `<!-- docs: needs weights -->` line and is only compiled,
its names from `diffstyler` checked), every `diffstyler ...` command in a bash block parses against the
current command line, the README's links lead somewhere, and the site builds with `mkdocs build --strict`.
A block that follows `<!-- docs: file NAME -->` is a file the reader writes (a list of styles): it is
written as NAME before the page's later commands parse.

Each page runs in its own temporary working folder holding links to the checkout's `configs/` and
`data/`, so that what a block or a command writes (`outputs/...`, `my.yaml`) stays out of the checkout.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

import diffstyler
from diffstyler.cli import main
from diffstyler.cli.command_line import SUBCOMMANDS
from diffstyler.cli.tools import PARSERS

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- docs: (needs weights|file (\S+)) -->")
LINKED_FOLDERS = ("configs", "data")  # what the pages' relative paths reach from the repository root


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int  # of the opening fence, 1-based
    needs_weights: bool = False
    file: str | None = None  # the name of the file the block shows


def code_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, with the marker line that may precede each."""
    blocks, lines = [], page.read_text().splitlines()
    index = 0
    while index < len(lines):
        if lines[index].startswith("```"):
            start = index
            index += 1
            while not lines[index].startswith("```"):
                index += 1
            before = [line for line in lines[:start] if line.strip()]
            marker = MARKER.fullmatch(before[-1].strip()) if before else None
            blocks.append(Block(lines[start][3:].strip().split(" ")[0], "\n".join(lines[start + 1 : index]) + "\n", start + 1,
                                needs_weights=bool(marker) and marker.group(1) == "needs weights",
                                file=marker.group(2) if marker else None))
        index += 1
    return blocks


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO_ROOT)) if page.is_relative_to(REPO_ROOT) else page.name


@pytest.fixture
def page_folder(tmp_path, monkeypatch) -> Path:
    """A working folder like the repository root (its configs/ and data/), empty otherwise."""
    for name in LINKED_FOLDERS:
        (tmp_path / name).symlink_to(REPO_ROOT / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    return tmp_path


# --- Python blocks ----------------------------------------------------------------------------------

PYTHON_PAGES = [page for page in PAGES if any(block.language == "python" for block in code_blocks(page))]


def names_imported_from_diffstyler(code: str) -> list[str]:
    return [alias.name for node in ast.walk(ast.parse(code)) if isinstance(node, ast.ImportFrom) and node.module == "diffstyler"
            for alias in node.names]


@pytest.mark.slow
@pytest.mark.parametrize("page", PYTHON_PAGES, ids=page_id)
def test_every_python_block_runs_on_the_tiny_models(page, page_folder):
    """Caught: a renamed or removed API name, a changed signature or default the example relies on,
    or an example that no longer runs. The blocks of a page run in order, in one namespace."""
    namespace: dict = {"__name__": "__docs__"}
    for block in [block for block in code_blocks(page) if block.language == "python"]:
        where = f"{page_id(page)}:{block.line}"
        compiled = compile(block.code, where, "exec")
        unknown = sorted(set(names_imported_from_diffstyler(block.code)) - set(diffstyler.__all__))
        assert unknown == [], f"{where} imports names diffstyler does not have"
        if not block.needs_weights:
            exec(compiled, namespace)


def test_the_python_blocks_that_need_weights_are_few_and_marked():
    """Caught: the marker put on a block that could run on the tiny models (it would stop being tested)."""
    marked = [(page_id(page), block.line) for page in PAGES for block in code_blocks(page) if block.needs_weights]
    for page, line in marked:
        block = next(b for b in code_blocks(REPO_ROOT / page) if b.line == line)
        assert re.search(r"from_pretrained\(\"(?!tiny)|StableDiffusion\w*Pipeline", block.code), f"{page}:{line}"
    assert len(marked) <= 3


# --- commands ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    args: list[str]
    redirect: str | None  # `> FILE`
    where: str
    files: tuple[Block, ...] = ()  # the page's file blocks before the command


SEPARATORS = {";", "&&", "&", "||", "|"}


def shell_tokens(block: str) -> list[str]:
    """The block's words as a shell reads them (quotes removed, comments dropped, continued lines
    joined), with ";" between lines."""
    tokens: list[str] = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens += [*lexer, ";"]
    return tokens


def expand_for_loops(tokens: list[str]) -> list[str]:
    """`for VAR in a b; do BODY; done` as BODY once per value, with $VAR replaced."""
    if "for" not in tokens:
        return tokens
    start = tokens.index("for")
    variable, values_end = tokens[start + 1], tokens.index("do", start)
    values = [value for value in tokens[start + 3 : values_end] if value != ";"]
    end = tokens.index("done", values_end)
    body = tokens[values_end + 1 : end]
    expanded = [token.replace(f"${variable}", value) for value in values for token in [*body, ";"]]
    return tokens[:start] + expanded + expand_for_loops(tokens[end + 1 :])


def diffstyler_commands(page: Path) -> list[Command]:
    """Every `diffstyler ...` (also `.venv/bin/diffstyler`, `-m diffstyler.cli`) of the page's bash blocks."""
    commands, files = [], []
    for block in code_blocks(page):
        if block.file:
            files.append(block)
        if block.language not in ("bash", "sh") or block.file:
            continue
        simple: list[list[str]] = [[]]
        for token in expand_for_loops(shell_tokens(block.code)):
            if token in SEPARATORS:
                simple.append([])
            else:
                simple[-1].append(token)
        for words in simple:
            program = next((i for i, word in enumerate(words) if word == "diffstyler" or word.endswith("/diffstyler")), None)
            if program is None and "diffstyler.cli" in words:
                program = words.index("diffstyler.cli")
            if program is None:
                continue
            args, redirect = words[program + 1 :], None
            if ">" in args:
                redirect = args[args.index(">") + 1]
                args = args[: args.index(">")]
            args = [re.sub(r"\$\{?\w+\}?", "0", arg) for arg in args]  # a shell variable left ($i of a loop): a number
            commands.append(Command(args, redirect, f"{page_id(page)}:{block.line}", tuple(files)))
    return commands


COMMAND_PAGES = [page for page in PAGES if diffstyler_commands(page)]


def parse_command(command: Command) -> str:
    """What `diffstyler <args>` prints when it only parses: `--print_config` for the Lightning
    subcommands, the argparse parser of the others."""
    subcommand = next(arg for arg in command.args if not arg.startswith("-"))
    if subcommand in PARSERS:
        position = command.args.index(subcommand)
        PARSERS[subcommand]().parse_args(command.args[:position] + command.args[position + 1 :])
        return ""
    assert subcommand in SUBCOMMANDS, f"{command.where}: unknown subcommand {subcommand!r}"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_info:
        main([*command.args, "--print_config"])
    assert exit_info.value.code in (0, None), f"{command.where}: diffstyler {' '.join(command.args)}"
    return printed.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("page", COMMAND_PAGES, ids=page_id)
def test_every_diffstyler_command_parses_against_the_current_cli(page, page_folder, capsys):
    """Caught: a command with a key that was renamed or removed, a config file that moved, a value of
    the wrong type, or a subcommand that no longer exists. A command's `> FILE` is written, so that a
    later `--config FILE` finds it."""
    for command in diffstyler_commands(page):
        for block in command.files:
            Path(block.file).write_text(block.code)
        output = parse_command(command)
        if command.redirect:
            Path(command.redirect).write_text(output)
    assert "error" not in capsys.readouterr().err.lower()


def test_the_command_reader_finds_commands_as_a_shell_would(tmp_path):
    """Caught: continued lines or loops not followed (commands missed), or a comment taken for arguments."""
    page = tmp_path / "page.md"
    page.write_text("```bash\nfor s in fit test; do diffstyler $s --config a.yaml; done   # two\n"
                    "X=1 .venv/bin/diffstyler predict --data.styles '[{lora: b}]' \\\n    --x 2 > out.yaml  # c\n"
                    "torchrun --nnodes 2 -m diffstyler.cli predict --config c.yaml & wait\n```\n")
    found = [(command.args, command.redirect) for command in diffstyler_commands(page)]
    assert found == [(["fit", "--config", "a.yaml"], None), (["test", "--config", "a.yaml"], None),
                     (["predict", "--data.styles", "[{lora: b}]", "--x", "2"], "out.yaml"),
                     (["predict", "--config", "c.yaml"], None)]


def test_ci_runs_the_readmes_test_command():
    ci_command = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines() if "-m pytest" in line][-1].strip()
    readme_commands = [line.strip() for block in code_blocks(REPO_ROOT / "README.md") for line in block.code.splitlines()]
    assert any(line.endswith(ci_command) for line in readme_commands)


# --- links and the site -----------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)|<img src=\"([^\"]+)\"")


def anchors(page: Path) -> set[str]:
    """The heading anchors MkDocs (its toc extension) gives a page."""
    headings, in_code = [], False
    for line in page.read_text().splitlines():
        in_code = in_code != line.startswith("```")
        if not in_code and line.startswith("#"):
            headings.append(line.lstrip("#").strip().replace("`", ""))
    return {slugify(heading, "-") for heading in headings}


def test_the_readmes_links_lead_to_files_and_headings_that_exist():
    """Caught: a page renamed or a heading changed under a README link (the site's own links are
    checked by the strict build)."""
    broken = []
    for match in LINK.finditer((REPO_ROOT / "README.md").read_text()):
        target = match.group(1) or match.group(2)
        if re.match(r"\w+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = REPO_ROOT / path
        if not file.exists() or (anchor and anchor not in anchors(file)):
            broken.append(target)
    assert broken == []


@pytest.mark.slow
def test_the_site_builds_strict(tmp_path):
    """Caught: a broken link or anchor between pages, a page left out of the nav, a docstring the API
    reference cannot render, or an API object moved away from the name api.md gives it."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("doc-object") > 20

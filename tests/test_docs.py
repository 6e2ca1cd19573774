"""The documentation holds together (pure logic: reads the Markdown and the
CLI's parser, no root): every relative link and image in README.md and
docs/ resolves to a file, every `drb COMMAND` the README shows is one that
`drb --help` lists, docs/usage.md names every command and option, and the
README stays a front page."""
import argparse
import glob
import os
import re

import pytest

from drb_uring.tools.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
USAGE = os.path.join(ROOT, "docs", "usage.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), with an optional "title" after the target.
INLINE_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
EXTERNAL = ("http://", "https://", "mailto:")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def links(text: str) -> list[str]:
    """The link and image targets of a Markdown text, outside code."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    return INLINE_LINK.findall(prose) + REFERENCE.findall(prose)


def code_blocks(text: str) -> list[str]:
    return [m.group(0) for m in FENCE.finditer(text)]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """The commands `drb --help` lists, with their parsers."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def shown_commands(text: str) -> set[str]:
    """COMMAND of every `drb COMMAND` (or `$ drb COMMAND`) line in a code block."""
    shown = set()
    for block in code_blocks(text):
        for line in block.splitlines():
            m = re.match(r"\s*(?:\$\s+)?drb\s+([a-z][\w-]*)", line)
            if m:
                shown.add(m.group(1))
    return shown


def test_pages_found():
    names = {_rel(p) for p in PAGES}
    for page in ("README.md", "docs/usage.md", "docs/architecture.md", "docs/operating.md",
                 "docs/security.md", "docs/results.md", "docs/development.md"):
        assert page in names


def test_link_extraction():
    text = ("[a](x.md) ![b](img/p.png) [`c`](y.md#part) [d](https://e.org) [e](f.md \"t\")\n"
            "`[not](inline.md)`\n```\n[not](fenced.md)\n```\n[r]: ref.md\n")
    assert sorted(links(text)) == sorted(["x.md", "img/p.png", "y.md#part",
                                          "https://e.org", "f.md", "ref.md"])


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    broken = []
    for target in links(_read(page)):
        if target.startswith(EXTERNAL):
            continue
        path = target.split("#", 1)[0]
        if not path:                    # an anchor in the same page
            continue
        if not os.path.exists(os.path.join(os.path.dirname(page), path)):
            broken.append(target)
    assert not broken, f"{_rel(page)}: broken links {broken}"


def test_readme_links_every_docs_page():
    text = _read(README)
    for page in ("usage", "architecture", "operating", "security", "results", "development"):
        assert f"](docs/{page}.md" in text, page


def test_readme_commands_exist():
    shown = shown_commands(_read(README))
    assert {"up", "exec", "trace", "down"} <= shown, shown
    missing = shown - set(subcommands())
    assert not missing, f"README shows commands drb --help does not list: {sorted(missing)}"


def test_usage_names_every_command_and_option():
    text = _read(USAGE)
    missing = []
    for name, parser in subcommands().items():
        if not re.search(rf"\bdrb {re.escape(name)}\b", text):
            missing.append(f"drb {name}")
        for action in parser._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help" and \
                        not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text):
                    missing.append(f"drb {name} {opt}")
    assert not missing, f"docs/usage.md does not mention {missing}"


def test_readme_is_a_front_page():
    assert os.path.getsize(README) <= 8192

"""The documentation: generated config reference up to date, links that resolve, the README's
shape, and every command-line flag documented."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from aimcpipe.launch import config_docs
from aimcpipe.launch.cli import build_parser
from aimcpipe.launch.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 250


# ---- docs/config.md is generated from the schema --------------------------------------------


def test_config_reference_is_what_the_generator_writes():
    assert (DOCS / "config.md").read_text(encoding="utf-8") == config_docs.render(), (
        "docs/config.md is stale: run `make docs` "
        "(python -m aimcpipe.launch.config_docs > docs/config.md)"
    )


def test_every_config_field_has_a_docstring():
    assert config_docs.missing_docstrings() == []


@dataclass(frozen=True)
class _Documented:
    a: int = 1
    """Documented."""
    b: int = 2
    c: str = "x"
    """Documented too."""


def test_a_field_without_a_docstring_is_found():
    assert config_docs.field_docs(_Documented) == {"a": "Documented.", "c": "Documented too."}
    assert config_docs.missing_docstrings(_Documented) == ["_Documented.b"]


def test_every_config_key_has_a_row():
    text = (DOCS / "config.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([\w.]+)` \|", text, flags=re.M))
    want = set()
    for section in config_docs.sections():
        for name in section.cls.__dataclass_fields__:
            want.add(f"{section.path}.{name}" if section.path else name)
    assert want <= rows
    assert {"pipeline.microbatches", "analog.device.tau", "ray.connect_timeout_s"} <= rows


@pytest.mark.parametrize(
    ("section", "extra"),
    [(s, e) for s, extras in config_docs.EXTRA_KEYS.items() for e in extras],
)
def test_documented_extra_keys_are_accepted(section, extra):
    data: dict = {"model": {"name": "digits-fcn"}}
    node = data
    for key in section.split("."):
        node = node.setdefault(key, {})
    node[extra.key] = extra.example
    TrainConfig.from_dict(data)


# ---- links -----------------------------------------------------------------------------------

_FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans."""
    return _CODE.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup and punctuation dropped, lowercase, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file (GitHub numbers repeats: x, x-1, x-2)."""
    seen: dict[str, int] = {}
    out = set()
    for line in _FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """The relative links (and images) of ``page`` that point to no file or no anchor."""
    bad = []
    for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no such anchor in {dest.name}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_the_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "other.md").write_text("# A title, with `code`!\n\n## Same\n\n## Same\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Here\n\n"
        "[ok](other.md#a-title-with-code) [ok](other.md#same-1) [ok](#here) ![ok](img.png)\n"
        "[web](https://example.com/x.md) `[in code](nothing.md)`\n\n"
        "```\n[in a block](nothing.md)\n```\n\n"
        "[bad](missing.md) [bad](other.md#nowhere) [bad](#nowhere) ![bad](gone.png)\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nowhere: no such anchor in other.md",
        "#nowhere: no such anchor in page.md",
        "gone.png: no such file",
    ]


def test_github_slugs():
    assert slug("`aimcpipe speedup`: the main job") == "aimcpipe-speedup-the-main-job"
    assert slug("3.2 Pulsed updates") == "32-pulsed-updates"
    assert slug("`optim.lr_schedule`") == "optimlr_schedule"
    assert slug("Where stages run: local, torch, Ray") == "where-stages-run-local-torch-ray"


# ---- the README and the docs' rules ---------------------------------------------------------


def test_readme_is_short_and_starts_with_the_two_set_up_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES
    first_block = README.read_text(encoding="utf-8").split("```")[1].splitlines()
    commands = [line.split("#")[0].strip() for line in first_block[1:] if line.strip()]
    assert commands[:2] == ["make run", "make test"]


def test_docs_and_docstrings_never_name_the_private_desk():
    desk = re.compile(r"(?<!\w)shared/|\.\./shared\b")
    code = [f for d in ("aimcpipe", "benchmarks") for f in sorted((ROOT / d).rglob("*.py"))]
    files = [*PAGES, *code, *sorted((ROOT / "configs").glob("*.yaml"))]
    named = [str(f.relative_to(ROOT)) for f in files if desk.search(f.read_text(encoding="utf-8"))]
    assert named == []


def test_index_lists_every_page():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(([\w-]+\.md)\)", index))
    assert {p.name for p in DOCS.glob("*.md")} - {"index.md"} <= linked


# ---- docs/cli.md has every flag ----------------------------------------------------------


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## ", text, flags=re.M)
    return {part.splitlines()[0]: part for part in parts[1:]}


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [
        flag
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
        for flag in action.option_strings
    ]


def test_cli_reference_documents_every_flag_of_every_command():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    parser = build_parser()
    sections = _sections(text)
    missing = []
    top = next(body for title, body in sections.items() if "Global" in title)
    missing += [f"aimcpipe {f}" for f in _flags(parser) if f"`{f}" not in top]
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in sub.choices.items():
        found = [body for title, body in sections.items() if f"`aimcpipe {name}`" in title]
        assert found, f"docs/cli.md has no section for aimcpipe {name}"
        missing += [f"aimcpipe {name} {f}" for f in _flags(command) if f"`{f}" not in found[0]]
    assert missing == []

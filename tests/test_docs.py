"""The documentation stays true: the generated references match the code, every relative link
points at a file, and the README stays a short front door with its two set-up commands."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = (
    "pip install -e . && biotune search",
    "pip install -e '.[test]' && HF_HUB_OFFLINE=1 python -m pytest -q",
)


def _reference():
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "docs" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["cli.md", "api.md"])
def test_the_generated_reference_is_up_to_date(name):
    reference = _reference()
    committed = (ROOT / "docs" / name).read_text()
    assert committed == reference.FILES[name](), (
        f"docs/{name} is stale: run python docs/reference.py and commit it"
    )


def test_the_cli_reference_lists_every_command_and_option():
    from biotune.cli import build_parser

    text = (ROOT / "docs" / "cli.md").read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if hasattr(a, "choices") and a.choices)
    for name, command in commands.choices.items():
        assert f"## `biotune {name}`" in text
        for action in command._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in text or f", {flag}" in text, (name, flag)


def _markdown_files() -> list[Path]:
    return [
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "benchmarks").glob("*/README.md")),
    ]


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for a file's headings: lower case, punctuation dropped, spaces to '-'."""
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_and_heading(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.relative_to(ROOT)} links to missing {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.relative_to(ROOT)}: no heading {target}"


def test_the_readme_is_a_short_front_door():
    readme = (ROOT / "README.md").read_text()
    for command in SETUP:
        assert f"\n{command}\n" in readme, command
    assert len(readme.split()) <= 2000
    usage, results = readme.index("## Quickstart"), readme.index("## Results at a glance")
    assert usage < results
    for stale in ("previous default", "changed on", "_make_child", "as of commit", "issue"):
        assert stale not in readme.lower(), stale

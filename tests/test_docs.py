"""The README is a front door that stays true: short, its set-up commands the ones CI runs,
every command in its table, every docs link resolving to a page the site builds. The code,
configs and scripts name only docs pages that exist, and the study drivers write pages the
site builds."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from fedscan.simulations.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

INSTALL_AND_RUN = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/fedscan train"
INSTALL_AND_TEST = (
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' && .venv/bin/python -m pytest"
)


def test_the_readme_is_at_most_200_lines() -> None:
    assert len(README.splitlines()) <= 200


def test_the_two_setup_commands_are_in_the_readme_and_ci_runs_the_test_one() -> None:
    assert INSTALL_AND_RUN in README
    assert INSTALL_AND_TEST in README
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert INSTALL_AND_TEST in ci, ".ci/run no longer runs the README's test command"


def test_every_fedscan_command_has_a_row_in_the_readme_table() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    rows = [line for line in README.splitlines() if line.startswith("| `fedscan ")]
    for name in sub.choices:
        assert any(row.startswith(f"| `fedscan {name}") for row in rows), name


def test_every_docs_link_in_the_readme_names_a_page_in_the_site_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", README)
    assert links
    for link in links:
        assert (ROOT / link).is_file(), link
        page = link.removeprefix("docs/")
        assert re.search(rf"^\s*-\s.*\b{re.escape(page)}\s*$", nav, re.M), f"{page} not in nav"


# Where the code, configs and scripts point a reader (comments, docstrings, messages).
POINTERS = ("common", "client", "server", "simulations", "configs", "benchmarks", "deploy", "tests")
DOCS_PATH = re.compile(r"\bdocs/[\w./-]+?\.md\b")


def test_every_docs_page_named_in_the_code_configs_and_scripts_exists() -> None:
    named: dict[str, list[str]] = {}
    old_section = "README: " + "default vs plain"  # a README section that moved to docs/results/
    stale = []
    for folder in POINTERS:
        for f in sorted((ROOT / folder).rglob("*")):
            if f.suffix not in {".py", ".yaml", ".yml", ".sh", ".toml"} or not f.is_file():
                continue
            text = f.read_text(errors="replace")
            for path in DOCS_PATH.findall(text):
                named.setdefault(path, []).append(str(f.relative_to(ROOT)))
            if old_section in text:
                stale.append(str(f.relative_to(ROOT)))
    assert "docs/how-to/coordinate.md" in named  # the scan found the pointers
    missing = {p: where for p, where in named.items() if not (ROOT / p).is_file()}
    assert not missing, f"pages named but not in docs/: {missing}"
    assert not stale, f"pointers to the README's old section: {stale}"


def test_the_study_drivers_write_pages_in_the_site_nav() -> None:
    from fedscan.simulations import finetune, horizon, study

    nav = (ROOT / "mkdocs.yml").read_text()
    for driver in (study, horizon, finetune):
        page = driver.PAGE.relative_to(ROOT / "docs").as_posix()
        assert driver.PAGE.is_file(), page
        assert re.search(rf"^\s*-\s.*\b{re.escape(page)}\s*$", nav, re.M), f"{page} not in nav"

"""The generated reference pages (docs/reference/) match the parsers and configs/."""

from __future__ import annotations

import difflib

import pytest

from fedscan.simulations.reference import COMMAND, DOCS, PAGES


@pytest.mark.parametrize("name", sorted(PAGES))
def test_the_checked_in_reference_page_is_up_to_date(name: str) -> None:
    """A new option, key or comment changes the page: regenerate it, never hand-edit."""
    fresh = PAGES[name]()
    path = DOCS / name
    stored = path.read_text() if path.exists() else ""
    if stored != fresh:
        diff = "".join(
            list(
                difflib.unified_diff(
                    stored.splitlines(keepends=True),
                    fresh.splitlines(keepends=True),
                    f"{path} (checked in)",
                    f"{name} (from the code)",
                )
            )[:40]
        )
        pytest.fail(f"docs/reference/{name} is stale; regenerate it with `{COMMAND}`\n{diff}")


def test_every_config_key_and_command_is_on_the_pages() -> None:
    """The pages cover the tree (`fedscan config`'s keys) and every sub-command."""
    from omegaconf import OmegaConf

    from fedscan.common.core.config import load_config
    from fedscan.simulations.cli import build_parser
    from fedscan.simulations.reference import _subcommands, cli_page, config_page

    config, cli = config_page(), cli_page()

    def leaves(tree: object, prefix: str = "") -> list[str]:
        if not isinstance(tree, dict):
            return [prefix[:-1]]
        return [k for key, v in tree.items() for k in leaves(v, f"{prefix}{key}.")]

    tree = OmegaConf.to_container(
        load_config(["dataset=brain_mri", "data_root=/x"], check_data=False)
    )
    missing = [k for k in leaves(tree) if f"`{k}`" not in config]
    assert not missing, missing
    for name, _, _ in _subcommands(build_parser()):
        assert f"## `fedscan {name}`" in cli

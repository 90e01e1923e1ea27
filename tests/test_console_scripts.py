"""Every console command of pyproject.toml imports and prints its --help (argparse formats every help string then,
so a stray "%" in one breaks the command for everybody)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
SCRIPTS = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_command_prints_its_help(name, capsys):
    module_name, function_name = SCRIPTS[name].split(":")
    main = getattr(importlib.import_module(module_name), function_name)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert f"usage: {name}" in capsys.readouterr().out

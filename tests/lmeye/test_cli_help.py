"""`lmeye --help` reads as whole sentences."""

from __future__ import annotations

import pytest

from lmeye.cli import main


def test_top_level_help_describes_the_tool_in_full_sentences(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    description = " ".join(text.split("\n\n")[1].split())
    assert description.startswith("LingCloud") and description.endswith(".")
    assert "lmeye COMMAND --help" in description

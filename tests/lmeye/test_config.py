from pathlib import Path

import pytest

from lmeye.cli import main
from lmeye.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"demo", "cc3m", "laion", "coco", "llava"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.download.output and cfg.extract.output and cfg.instruct.output


def test_unknown_key_is_one_line_naming_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("download:\n  url_column: url\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value) == f"{bad}: download.url_column: unknown key"


def test_wrong_type_names_key_and_value(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("download:\n  image_size: big\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: download.image_size: .*integer.*'big'"):
        load_config(bad)


def test_overrides_and_derived_paths():
    cfg = load_config(None, ["data.root=/x", "download.image_size=128"])
    assert cfg.download.image_size == 128
    assert cfg.download.output == "/x/pairs" and cfg.extract.input == "/x/pairs"
    assert cfg.instruct.features == "/x/features"
    with pytest.raises(ConfigError, match="--set nokey: expected section.key=value"):
        load_config(None, ["nokey"])


def test_cli_validate(capsys, tmp_path):
    assert main(["config", "validate", str(CONFIGS[0])]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("downlod: {}\n")
    assert main(["config", "validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lmeye config: error: {bad}: downlod: unknown key"
    assert "\n" not in err


def test_readme_config_reference_is_current(capsys):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert main(["config", "reference"]) == 0
    generated = capsys.readouterr().out.strip()
    start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
    assert readme.split(start)[1].split(end)[0] == generated, "run `lmeye config reference` and paste it into README.md"

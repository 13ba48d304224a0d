"""Config files and overrides that used to be misread: each case names the file and what is wrong with it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from looplm.infra.configs import ConfigFileError, load_config
from looplm.pipelines.training.config import PretrainConfig
from looplm.platform.cli import main as looplm_main


def test_an_exponent_without_a_dot_is_a_number_in_overrides_and_files(tmp_path):
    # PyYAML reads YAML 1.1, where 1e-3 (no dot) is a string; a float field takes it as the number it means.
    data = "data.generator=synthetic"
    assert load_config(PretrainConfig, None, [data, "optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)
    config = tmp_path / "train.yaml"
    config.write_text("data: {generator: synthetic}\noptim:\n  lr: 2E-4\n  min_lr: 1e-5\n")
    loaded = load_config(PretrainConfig, config)
    assert (loaded.optim.lr, loaded.optim.min_lr) == (pytest.approx(2e-4), pytest.approx(1e-5))
    with pytest.raises(ConfigFileError, match=r"optim.lr: expected a number, got 'fast'"):
        load_config(PretrainConfig, None, [data, "optim.lr=fast"])


def test_a_folder_and_an_empty_file_are_named_as_what_they_are(tmp_path):
    with pytest.raises(ConfigFileError, match="is a folder, not a YAML file"):
        load_config(PretrainConfig, tmp_path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n# nothing set\n")
    with pytest.raises(ConfigFileError, match="empty.yaml is empty"):
        load_config(PretrainConfig, empty)
    with pytest.raises(ConfigFileError, match="not found"):
        load_config(PretrainConfig, tmp_path / "missing.yaml")
    explicit = tmp_path / "defaults.yaml"
    explicit.write_text("{}\n")  # every default, on purpose: then the config's own checks speak
    with pytest.raises(ConfigFileError, match="name exactly one source of training data"):
        load_config(PretrainConfig, explicit)


@pytest.mark.parametrize("command", ["train", "curate", "eval", "run", "status"])
def test_the_cli_prints_one_line_and_exits_2_for_a_folder_given_as_config(command, tmp_path, capsys):
    assert looplm_main([command, str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a folder, not a YAML file" in err and "Traceback" not in err


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _train_commands() -> list[tuple[str, list[str]]]:
    """Every `looplm train configs/X.yaml ...` a config file's comments show, each optional [k=v] taken alone."""
    commands = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        for line in path.read_text().splitlines():
            found = re.match(r"#\s+looplm train (configs/\S+\.yaml)(.*?)(\s+#.*)?$", line)
            if not found:
                continue
            words = shlex.split(found.group(2).replace("[", " [ ").replace("]", " ] "))
            required, optional, depth = [], [], 0
            for word in words:
                depth += (word == "[") - (word == "]")
                if "=" in word and not word.startswith("-"):
                    (optional if depth else required).append(word)
            commands += [(found.group(1), required)] + [(found.group(1), [*required, o]) for o in optional]
    return commands


@pytest.mark.parametrize(("config", "overrides"), _train_commands())
def test_every_train_command_in_a_config_comment_is_accepted(config, overrides):
    load_config(PretrainConfig, CONFIGS.parent / config, overrides)

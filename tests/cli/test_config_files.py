"""Configs that extend another (`extends:` in `diffstyler.cli.config_files`): a family or smoke config
states only what differs from its base, and reads as the base followed by itself, key by key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from diffstyler.cli.config_files import EXTENDS_KEY, config_chain, config_sources, expand_extends
from diffstyler.errors import UserError
from tests.helpers import printed_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"


@pytest.mark.slow
def test_a_config_that_extends_another_overrides_it_key_by_key(tmp_path, monkeypatch, capsys):
    """Caught: the base applied after the child (its values win), or jsonargparse's own `config:` key
    in a file, which replaces whole groups (the child's `trainer:` would drop the base's max_steps and
    the logger's save_dir)."""
    (tmp_path / "family").mkdir()
    (tmp_path / "base.yaml").write_text(f"extends: {CONFIGS / 'smoke/style.yaml'}\ntrainer:\n  max_steps: 3\n")
    child = tmp_path / "family" / "child.yaml"
    child.write_text("extends: ../base.yaml\ntrainer:\n  logger:\n    init_args:\n      name: child\nmodel:\n  lora:\n    rank: 2\n")
    config = printed_config(["fit", "--config", str(child)], monkeypatch, capsys)
    assert config["trainer"]["max_steps"] == 3  # the middle config's, over the smoke config's 4
    assert config["trainer"]["logger"]["init_args"] == {**config["trainer"]["logger"]["init_args"], "name": "child",
                                                        "save_dir": "outputs/smoke/logs"}
    assert config["model"]["lora"]["rank"] == 2 and config["model"]["model"]["name"] == "tiny"
    assert config["data"]["resolution"] == 64  # the smoke config's, two levels up


def test_the_chain_is_base_first_relative_to_each_files_folder_and_named_for_errors(tmp_path):
    """Caught: `extends` read relative to the working folder, the chain in the wrong order, or the
    base's keys attributed to the child (an unknown key in the base must name the base's file)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "base.yaml").write_text("model:\n  typo: 1\n")
    (tmp_path / "a" / "child.yaml").write_text("extends: ../base.yaml\ndata:\n  resolution: 8\n")
    child = str(tmp_path / "a" / "child.yaml")
    assert [source.name for source in config_chain(child)] == [str(tmp_path / "a" / "../base.yaml"), child]
    args = expand_extends(["fit", "--config", child, "--data.resolution", "16"])
    assert args[:3] == ["fit", "--config", str(tmp_path / "a" / "../base.yaml")]
    assert yaml.safe_load(args[4]) == {"data": {"resolution": 8}} and args[5:] == ["--data.resolution", "16"]
    sources = config_sources(["fit", "--config", child], "fit")
    assert [source.values for source in sources] == [{"model": {"typo": 1}}, {"data": {"resolution": 8}}]


def test_a_missing_base_or_a_loop_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "child.yaml").write_text("extends: nope.yaml\n")
    with pytest.raises(UserError, match=r"config file to extend not found \(extends: nope.yaml in .*child.yaml\)"):
        expand_extends(["fit", "--config", str(tmp_path / "child.yaml")])
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(UserError, match="extend each other in a loop"):
        config_chain(str(tmp_path / "a.yaml"))


def leaves(values: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a.b": value}` for every leaf of nested mappings (a list is one leaf)."""
    if not isinstance(values, dict):
        return {prefix: values}
    found = {}
    for key, value in values.items():
        found.update(leaves(value, f"{prefix}.{key}" if prefix else key))
    return found


EXTENDING_CONFIGS = sorted(str(path.relative_to(REPO_ROOT)) for path in CONFIGS.rglob("*.yaml")
                           if EXTENDS_KEY in (yaml.safe_load(path.read_text()) or {}))


def test_the_family_and_smoke_configs_extend_a_base():
    """Caught: a family or smoke config copied out in full again (a default changed in the base
    would not reach it)."""
    expected = {"configs/sd15/style.yaml", "configs/sd15/stylize.yaml", "configs/sdxl/style.yaml", "configs/sdxl/stylize.yaml",
                "configs/smoke/style.yaml", "configs/smoke/stylize.yaml", "configs/smoke/sd15/style.yaml",
                "configs/smoke/sd15/stylize.yaml", "configs/smoke/sdxl/style.yaml", "configs/smoke/sdxl/stylize.yaml",
                "configs/smoke/batch.yaml", "configs/smoke/localized.yaml", "configs/smoke/evaluate.yaml",
                "configs/batch.yaml", "configs/localized.yaml", "configs/smoke/presets/paper_code.yaml"}
    assert expected <= set(EXTENDING_CONFIGS)


@pytest.mark.parametrize("config", EXTENDING_CONFIGS)
def test_a_config_that_extends_another_states_only_what_differs(config):
    """Caught: a key restated with the value its base already gives (a default then lives in two
    files). Lists are compared whole: a list replaces the base's list."""
    chain = config_chain(str(REPO_ROOT / config))
    base: dict[str, Any] = {}
    for source in chain[:-1]:
        base.update(leaves(source.values))
    repeated = {key: value for key, value in leaves(chain[-1].values).items() if key in base and base[key] == value}
    assert repeated == {}

"""The config files of a command line (`--config FILE`, `-c FILE`), read before any parser exists,
and protocol files (one file with a section per subcommand).

A file that is missing, is not YAML or does not hold a mapping is reported here, naming the file
(and the line of a YAML error), before torch and lightning are imported. What the files hold is
checked by the parser; these readings only tell, for an unknown key, which file it came from.
jsonargparse also takes a YAML string in place of a file (`--config '{trainer: {max_steps: 3}}'`):
a value that is no file but reads as a mapping is such a string.

A config file may name the config it overlays with `extends: <file>` (relative to its own folder):
`--config configs/sd15/style.yaml` then reads as `--config configs/style.yaml --config <the rest of
configs/sd15/style.yaml>`, so a family or smoke config states only what differs from its base and a
default is changed in one file (`expand_extends`). The base may itself extend another one.

A protocol file (configs/protocols/styleid.yaml) has a section per subcommand (a subcommand's name
among its top-level keys); each subcommand is given only its own section (`protocol_stage`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from diffstyler.cli.command_line import SUBCOMMANDS
from diffstyler.errors import MissingFileError, UserError

CONFIG_OPTIONS = ("--config", "-c")
EXTENDS_KEY = "extends"  # a config file's key naming the config file it overlays


@dataclass(frozen=True)
class ConfigSource:
    """A config the parser reads: its name for the user (the file) and what it holds."""

    name: str
    values: dict[str, Any]


def config_options(args: list[str]) -> Iterator[tuple[int, int, str]]:
    """(index, number of arguments, value) of each `--config VALUE`, `--config=VALUE`, `-c VALUE`."""
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in CONFIG_OPTIONS and index + 1 < len(args):
            yield index, 2, args[index + 1]
            index += 2
            continue
        if arg.startswith("--config="):
            yield index, 1, arg.split("=", 1)[1]
        index += 1


def config_sources(args: list[str], subcommand: str) -> list[ConfigSource]:
    """Every config of the command line, in order; a protocol file gives its `subcommand` section."""
    sources = []
    for _, _, value in config_options(args):
        if not is_file(value):
            sources.append(ConfigSource(f"--config {value!r}", inline_config(value)))
            continue
        values = read_config_file(value)
        if is_protocol(values):
            sources.append(ConfigSource(f"{value} ({subcommand} section)", protocol_section(values, value, subcommand)))
        else:
            sources += config_chain(value)
    return sources


# --- configs that extend another ------------------------------------------------------------------

def config_chain(file: str) -> list[ConfigSource]:
    """`file` and the configs it extends, the base first, each without its `extends` key (UserError
    naming the file for a base that is missing, not YAML, or that extends itself in a loop)."""
    chain: list[ConfigSource] = []
    seen: set[Path] = set()
    name: Optional[str] = file
    while name is not None:
        path = Path(name)
        if path.resolve() in seen:
            raise UserError("config files extend each other in a loop", name, f"{name} is extended again by {chain[0].name}")
        seen.add(path.resolve())
        values = dict(read_config_file(name))
        base = values.pop(EXTENDS_KEY, None)
        chain.insert(0, ConfigSource(name, values))
        name = base_file(base, name) if base is not None else None
    return chain


def base_file(base: Any, file: str) -> str:
    """The file that `extends: <base>` in `file` names, relative to `file`'s folder."""
    if not isinstance(base, str) or not base:
        raise UserError(f"invalid {EXTENDS_KEY}", file, f"give the config file it overlays, relative to {file}'s folder")
    path = Path(file).parent / base
    if not path.is_file():
        raise MissingFileError(f"config file to extend not found ({EXTENDS_KEY}: {base} in {file})", str(path),
                               "it is a folder" if path.is_dir() else "no such file")
    return str(path)


def expand_extends(args: list[str]) -> list[str]:
    """Each `--config FILE` whose FILE extends another replaced by one `--config` per config of its
    chain, the base first: files that extend nothing as they are, the others inline as YAML without
    their `extends` key (jsonargparse reads a config string as a file). jsonargparse's own reading of
    a `config:` key in a file replaces whole groups (`trainer:` of the file drops the base's other
    trainer keys), where `--config A --config B` overrides key by key."""
    expanded = []
    start = 0
    for index, width, value in config_options(args):
        expanded += args[start:index]
        start = index + width
        values = read_config_file(value) if is_file(value) else None
        if values is None or EXTENDS_KEY not in values or is_protocol(values):
            expanded += args[index : index + width]
            continue
        for source in config_chain(value):
            extends = EXTENDS_KEY in read_config_file(source.name)
            expanded += ["--config", yaml.safe_dump(source.values, sort_keys=False) if extends else source.name]
    return expanded + args[start:]


def is_file(value: str) -> bool:
    """Whether a `--config` value names a file (an inline YAML string may be too long for a path)."""
    try:
        return Path(value).is_file()
    except OSError:
        return False


def is_dir(value: str) -> bool:
    try:
        return Path(value).is_dir()
    except OSError:
        return False


def read_config_file(file: str) -> dict[str, Any]:
    """The mapping a YAML config file holds (UserError naming the file when it is none)."""
    try:
        values = yaml.safe_load(Path(file).read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise UserError("config file unreadable", file, str(error)) from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark is not None else file
        raise UserError("config file is not valid YAML", where, getattr(error, "problem", None) or str(error)) from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError("config file does not hold a mapping of keys", file, f"it holds a {type(values).__name__}")
    return values


def inline_config(value: str) -> dict[str, Any]:
    """A `--config` value that is no file: a YAML mapping given inline, else a missing file."""
    try:
        values = yaml.safe_load(value)
    except yaml.YAMLError:
        values = None
    if not isinstance(values, dict):
        why = "it is a folder" if is_dir(value) else "no such file"
        raise MissingFileError("config file not found", value, why)
    return values


def source_of(key: str, sources: list[ConfigSource]) -> Optional[str]:
    """The name of the last config that sets `key` (`a.b.c`), the one whose value counts."""
    for source in reversed(sources):
        values: Any = source.values
        for part in key.split("."):
            if not isinstance(values, dict) or part not in values:
                break
            values = values[part]
        else:
            return source.name
    return None


# --- protocol files -------------------------------------------------------------------------------

def protocol_stage(args: list[str], subcommand: str) -> list[str]:
    """Each `--config FILE` where FILE is a protocol replaced by `--config <FILE's section>` right
    after the subcommand: `diffstyler fit --config P` and `diffstyler --config P fit` both run P's fit.

    LightningCLI builds one module pair for all its subcommands, so it would check every section
    of such a file against this subcommand's classes and refuse the other stages' keys. The
    section goes inline as YAML (jsonargparse reads a config string as a file). The ranks that
    DDP starts run `main` on the original command line, and so pick the same section.
    """
    if subcommand not in args:
        return args
    kept, stages = [], []
    start = 0
    for index, width, value in config_options(args):
        kept += args[start:index]
        values = read_config_file(value) if is_file(value) else None
        if values is not None and is_protocol(values):
            stages += ["--config", yaml.safe_dump(protocol_section(values, value, subcommand), sort_keys=False)]
        else:
            kept += args[index : index + width]
        start = index + width
    kept += args[start:]
    position = kept.index(subcommand) + 1
    return kept[:position] + stages + kept[position:]


def is_protocol(values: dict[str, Any]) -> bool:
    return any(name in values for name in SUBCOMMANDS)


def protocol_section(values: dict[str, Any], file: str, subcommand: str) -> dict[str, Any]:
    """The subcommand's section of a protocol file's `values`."""
    if not isinstance(values.get(subcommand), dict):
        stages = ", ".join(name for name in SUBCOMMANDS if name in values)
        raise UserError(f"no {subcommand} section", file, f"this protocol file has sections {stages}; add {subcommand}:")
    return values[subcommand]

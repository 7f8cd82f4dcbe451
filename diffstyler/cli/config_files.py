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
among its top-level keys); each subcommand is given only its own section (`protocol_stage`). It may
run several methods on the same inputs: `methods` maps each method's name to what it changes in
the sections (`{}`: nothing; a stage `null`: the method has no such stage, as StyleID has no fit),
`method` names the one the stages run, and `--method NAME` on the command line chooses another
(`protocol_section`). `diffstyler compare` runs every method of such a file and compares them.
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
METHOD_OPTION = "--method"  # a protocol file's method (`protocol_section`)
METHOD_KEY, METHODS_KEY = "method", "methods"  # a protocol file's chosen method, and every method's changes


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


def method_option(args: list[str]) -> tuple[Optional[str], list[str]]:
    """The value of `--method NAME` / `--method=NAME` (None when absent), and `args` without it."""
    method, kept = None, []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == METHOD_OPTION:
            if index + 1 >= len(args) or args[index + 1].startswith("-"):
                raise UserError(f"{METHOD_OPTION} needs a value", METHOD_OPTION, "give the protocol's method, e.g. --method styleid")
            method, index = args[index + 1], index + 2
            continue
        if arg.startswith(METHOD_OPTION + "="):
            method = arg.split("=", 1)[1]
        else:
            kept.append(arg)
        index += 1
    return method, kept


def config_sources(args: list[str], subcommand: str) -> list[ConfigSource]:
    """Every config of the command line, in order; a protocol file gives its `subcommand` section
    (of the method `--method` names)."""
    method, args = method_option(args)
    sources = []
    for _, _, value in config_options(args):
        if not is_file(value):
            sources.append(ConfigSource(f"--config {value!r}", inline_config(value)))
            continue
        values = read_config_file(value)
        if is_protocol(values):
            sources.append(ConfigSource(f"{value} ({subcommand} section)", protocol_section(values, value, subcommand, method)))
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
    `--method NAME` (taken out of the arguments) picks the section of that method of P.

    LightningCLI builds one module pair for all its subcommands, so it would check every section
    of such a file against this subcommand's classes and refuse the other stages' keys. The
    section goes inline as YAML (jsonargparse reads a config string as a file). The ranks that
    DDP starts run `main` on the command line made here, and so run the same section.
    """
    method, args = method_option(args)
    if subcommand not in args:
        return args
    kept, stages = [], []
    start = 0
    for index, width, value in config_options(args):
        kept += args[start:index]
        values = read_config_file(value) if is_file(value) else None
        if values is not None and is_protocol(values):
            stages += ["--config", yaml.safe_dump(protocol_section(values, value, subcommand, method), sort_keys=False)]
        else:
            kept += args[index : index + width]
        start = index + width
    kept += args[start:]
    if method is not None and not stages:
        raise UserError(f"{METHOD_OPTION} without a protocol file", METHOD_OPTION,
                        "it chooses a method of a protocol file (--config configs/protocols/styleid.yaml)")
    position = kept.index(subcommand) + 1
    return kept[:position] + stages + kept[position:]


def is_protocol(values: dict[str, Any]) -> bool:
    return any(name in values for name in SUBCOMMANDS)


def protocol_section(values: dict[str, Any], file: str, subcommand: str, method: Optional[str] = None) -> dict[str, Any]:
    """The subcommand's section of a protocol file's `values` for `method` (None: the file's
    `method`): the section with what `methods.<method>.<subcommand>` changes merged into it
    (mappings key by key, any other value replaced whole, a list too)."""
    if not isinstance(values.get(subcommand), dict):
        stages = ", ".join(name for name in SUBCOMMANDS if name in values)
        raise UserError(f"no {subcommand} section", file, f"this protocol file has sections {stages}; add {subcommand}:")
    changes = protocol_methods(values, file)
    method = method if method is not None else values.get(METHOD_KEY)
    if method is None:
        return values[subcommand]
    if method not in changes:
        known = ", ".join(changes) or "none"
        raise UserError(f"unknown method {method!r}", file, f"this protocol's {METHODS_KEY} are {known}")
    stage_changes = changes[method].get(subcommand, {})
    if stage_changes is None:
        raise UserError(f"no {subcommand} for method {method}", file,
                        f"{METHODS_KEY}.{method}.{subcommand} is null: the method has no {subcommand} stage")
    return merged(values[subcommand], stage_changes)


def protocol_methods(values: dict[str, Any], file: str) -> dict[str, dict[str, Any]]:
    """A protocol's `methods`: each method's name and its changes per stage (a mapping or null)."""
    given = values.get(METHODS_KEY) or {}
    if not isinstance(given, dict):
        raise UserError(f"invalid {METHODS_KEY}", file, "give a mapping of method names to their changes per stage ({} for none)")
    methods = {}
    for name, changes in given.items():
        changes = changes or {}
        if not isinstance(changes, dict) or any(stage not in SUBCOMMANDS for stage in changes):
            raise UserError(f"invalid {METHODS_KEY}.{name}", file, f"give stages ({', '.join(SUBCOMMANDS)}) and what the "
                                                                   "method changes in each (null: no such stage)")
        if any(section is not None and not isinstance(section, dict) for section in changes.values()):
            raise UserError(f"invalid {METHODS_KEY}.{name}", file, "each stage's changes are a mapping of keys, or null")
        methods[name] = changes
    if values.get(METHOD_KEY) is not None and values[METHOD_KEY] not in methods:
        raise UserError(f"unknown {METHOD_KEY} {values[METHOD_KEY]!r}", file, f"name one of {METHODS_KEY}: {', '.join(methods) or 'none'}")
    return methods


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes`: mappings merged key by key, any other value (a list too) replaced."""
    result = dict(base)
    for key, value in changes.items():
        result[key] = merged(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) else value
    return result

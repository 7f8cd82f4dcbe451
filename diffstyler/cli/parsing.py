"""Exact parsing: what the `diffstyler` parsers accept beyond jsonargparse's defaults, and what they
refuse, as one line that names the key and where it came from.

- No abbreviations (`allow_abbrev=False` on every parser): `--model.sampling.step 20` is an unknown
  option, not `steps`.
- Where a list is expected, a single value is a list of one: any parameter typed `list[...]` or
  `Optional[list[...]]` (`data.content photo.png`, `data.images: style.png` in a YAML file,
  `--model.injection.feature_layers 5`), on the command line and in config files alike.
- An unknown key names the option or the config file it came from and the nearest known key:
  `unknown config key (model.sampling.stepz in my.yaml): did you mean model.sampling.steps?`.
- jsonargparse's reports about Union types ("Does not validate against any of the Union
  subtypes ...") become the reason of the option that failed, in one line.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import typing
from typing import Any, Optional, Sequence

import yaml
from jsonargparse import ArgumentError, ArgumentParser, get_loader

# jsonargparse's action for a typed parameter (not exported; jsonargparse 4.53): its `_check_type`
# checks every value, from the command line and from config files.
from jsonargparse._typehints import ActionTypeHint

from diffstyler.cli.config_files import ConfigSource, source_of
from diffstyler.errors import UserError, config_error, first_line

# For LightningCLI's main parser; jsonargparse gives them to each subcommand's parser. exit_on_error
# off: jsonargparse raises ArgumentError, which `parse_error` turns into the line `main` prints.
PARSER_SETTINGS = {"exit_on_error": False, "allow_abbrev": False}


# --- a single value where a list is expected ----------------------------------------------------

class SingleValueAsList(ActionTypeHint):
    """The action of a parameter typed `list[...]` or `Optional[list[...]]` that also takes a single
    value, as a list of one. Only a value that fails as given is wrapped, so lists, `null` and
    `+=` appends keep their meaning."""

    def _check_type(self, value: Any, append: bool = False, cfg: Any = None, mode: Any = None) -> Any:
        try:
            return super()._check_type(value, append=append, cfg=cfg, mode=mode)
        except TypeError:
            single = as_single_value(value)
            if append or single is None:
                raise
            return super()._check_type([single], append=append, cfg=cfg, mode=mode)


def accept_single_values_as_lists(parser: ArgumentParser) -> None:
    """Give every list-typed parameter of `parser` the `SingleValueAsList` action (jsonargparse
    made the actions from the class signatures; the nested dataclass fields are among them)."""
    for action in parser._actions:
        if type(action) is ActionTypeHint and is_list_type(action._typehint):
            action.__class__ = SingleValueAsList


def is_list_type(typehint: Any) -> bool:
    """`list[X]`, or a Union of `list[X]` and None."""
    options = [option for option in typing.get_args(typehint) if option is not type(None)]
    if typing.get_origin(typehint) is typing.Union and len(options) == 1:
        typehint = options[0]
    return typing.get_origin(typehint) is list


def as_single_value(value: Any) -> Optional[Any]:
    """`value` as loaded (a command-line string is YAML, as jsonargparse reads it), or None when it
    is not a single value: a list, null, or a nested option such as `--data.styles.lora x` (which
    jsonargparse passes as a tuple)."""
    if isinstance(value, str):
        try:
            value = get_loader("yaml")(value)
        except yaml.YAMLError:  # a string YAML cannot read is a single string, as jsonargparse takes it
            return value
    if value is None or isinstance(value, (list, tuple)):
        return None
    return value


# --- errors as one line ---------------------------------------------------------------------------
# jsonargparse reports a bad value as a chain of exceptions (`__cause__`), one per level of the
# value: 'Parser key "data.styles"' -> 'Problem with given class_path StyleEntry' -> 'Parser key
# "scale"' -> "Expected a <class 'float'>. Got value: big". The chain gives the key path, the class
# whose keys were checked, and the reason at the bottom; the messages above it repeat the reasons
# of every member of a Union, which is what the user must not read.

UNRECOGNIZED = re.compile(r"unrecognized arguments: (\S+)")
UNKNOWN_KEY = [
    (re.compile(r"Subcommand '[^']+' does not accept option '([^']+)'"), "{0}"),
    (re.compile(r"Group '([^']+)' does not accept option '([^']+)'"), "{0}.{1}"),
    (re.compile(r"Option '([^']+)' is not accepted"), "{0}"),
]
PARSER_KEY = re.compile(r'\s*Parser key "([^"]+)"')
CLASS_PATH = re.compile(r"\s*Problem with given class_path '([^']+)'")
EXPECTED_TYPE = re.compile(r"Expected a <class '(\w+)'>\. Got value: (.*)")


def parse_error(error: ArgumentError, parser: ArgumentParser, sources: Sequence[ConfigSource], args: Sequence[str]) -> UserError:
    """jsonargparse's error as the one line the user reads: an unknown key with the option or file
    it came from and the nearest known key, or a bad value with its key and the reason."""
    unrecognized = UNRECOGNIZED.search(str(error))
    if unrecognized is not None:
        option = unrecognized.group(1).split("=", 1)[0]
        if not option.startswith("-"):
            return UserError("unexpected argument", option, "options are given as --key value; see --help for the keys")
        return UserError("unknown option", option, suggestion(option.lstrip("-"), known_keys(parser), prefix="--"))
    chain = causes(error)
    keys = [found.group(1) for found in map(PARSER_KEY.match, map(str, chain)) if found is not None]
    keys = [key for index, key in enumerate(keys) if index == 0 or key != keys[index - 1]]  # each level says it twice
    owners = [found.group(1) for found in map(CLASS_PATH.match, map(str, chain)) if found is not None]
    reason = first_line(chain[-1])
    unknown = unknown_key(reason)
    if not keys:
        if unknown is None:
            return UserError(first_line(error))
        source = source_of(unknown, sources)
        return UserError("unknown config key", f"{unknown} in {source}" if source else unknown, suggestion(unknown, known_keys(parser)))
    where = key_path(keys, parser) + (f".{unknown}" if unknown else "")
    if not given_on_command_line(keys[0], args) and source_of(keys[0], sources):
        where += f" in {source_of(keys[0], sources)}"
    if unknown is not None:
        fields = parameter_names(owners[-1]) if owners else []
        return UserError("unknown config key", where, suggestion(unknown, fields) if fields else "see --help for the keys")
    return config_error(where, plain_reason(reason))


def causes(error: BaseException) -> list[BaseException]:
    """`error` and the errors it was raised from (`raise ... from`), outermost first."""
    chain = [error]
    while chain[-1].__cause__ is not None and chain[-1].__cause__ not in chain:
        chain.append(chain[-1].__cause__)
    return chain


def unknown_key(message: str) -> Optional[str]:
    for pattern, key in UNKNOWN_KEY:
        found = pattern.search(message)
        if found is not None:
            return key.format(*found.groups())
    return None


def key_path(keys: list[str], parser: ArgumentParser) -> str:
    """`data.styles[].mask` for the keys of the chain ['data.styles', 'mask']: `[]` where the value is
    a list (jsonargparse does not say which item failed)."""
    action = next((action for action in parser._actions if action.dest == keys[0]), None)
    top = keys[0] + ("[]" if action is not None and is_list_type(getattr(action, "_typehint", None)) else "")
    return ".".join([top, *keys[1:]])


def given_on_command_line(key: str, args: Sequence[str]) -> bool:
    option = f"--{key}"
    return any(arg == option or arg.startswith((f"{option}=", f"{option}.", f"{option}+")) for arg in args)


def suggestion(key: str, known: list[str], prefix: str = "") -> str:
    """'did you mean <the nearest known key>?', or the keys of the group it is in."""
    nearest = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if nearest:
        return f"did you mean {prefix}{nearest[0]}?"
    group = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [name[len(group) + 1:] for name in known if group and name.startswith(f"{group}.") and "." not in name[len(group) + 1:]]
    if siblings:
        return f"{prefix}{group} has: {', '.join(siblings)}"
    return "see --help for the keys"


def known_keys(parser: ArgumentParser) -> list[str]:
    """Every key the parser takes (`model.sampling.steps`, `trainer.max_steps`, `ckpt_path`, ...)."""
    return [action.dest for action in parser._actions if action.dest not in ("help", "config", "print_config")]


def parameter_names(class_path: str) -> list[str]:
    """The keys a class takes (its `__init__` parameters; a dataclass's fields)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [parameter for parameter in inspect.signature(cls).parameters if parameter not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def plain_reason(reason: str) -> str:
    """"Expected a <class 'float'>. Got value: big" as "expected float, got big"."""
    expected = EXPECTED_TYPE.match(reason)
    if expected is not None:
        return f"expected {expected.group(1)}, got {expected.group(2)}"
    return reason

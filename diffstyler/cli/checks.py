"""Checks of a parsed subcommand config before anything is instantiated (no model, no data read)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

from jsonargparse import Namespace

from diffstyler.checks import check_checkpoint_file
from diffstyler.errors import UserError, config_error, first_line

# Lightning's own names for a checkpoint it finds itself (`--ckpt_path last`); no file to check.
SPECIAL_CHECKPOINTS = ("last", "hpc", "registry")


def check_inputs(config: Namespace, model_class: type, datamodule_class: type) -> None:
    """Everything about the subcommand's config that needs no model (raises UserError)."""
    for group, component in (("model", model_class), ("data", datamodule_class)):
        check_dataclass_values(config.get(group), component, group)
    checkpoint = config.get("ckpt_path")
    if checkpoint and checkpoint not in SPECIAL_CHECKPOINTS:
        check_checkpoint_file(checkpoint, "ckpt_path")
        # Lightning would load it with torch's default; weights only, whatever --weights_only says.
        config.weights_only = True


def check_fit_steps(trainer: Namespace) -> None:
    """A fit trains `trainer.max_steps` LoRA steps: 0 would export an untrained LoRA, and -1
    (Lightning's "no limit") would train until `max_epochs`, 1000 by default (one step per epoch)."""
    max_steps = trainer.get("max_steps")
    if max_steps is not None and max_steps < 1:
        raise config_error("trainer.max_steps", f"must be >= 1 (the LoRA's training steps), got {max_steps}")


def check_dataclass_values(values: Optional[Namespace], component: type, group: str) -> None:
    """Build every dataclass argument of `component` from `values` once, naming the key that fails.

    jsonargparse builds them too, but its message for a dataclass inside Optional or a list (e.g.
    `data.styles[0].mask`) is a multi-line union report that does not say which key failed.
    """
    if values is None:
        return
    hints = typing.get_type_hints(component.__init__)
    for name, hint in hints.items():
        if name != "return" and name in values:
            build_value(values[name], hint, f"{group}.{name}")


def build_value(value: Any, hint: Any, key: str) -> Any:
    """`value` (as parsed) built into `hint`'s dataclasses, nested through Optional, Union and lists."""
    if value is None:
        return None
    if dataclasses.is_dataclass(hint) and isinstance(value, (Namespace, dict)):
        return build_dataclass(value, hint, key)
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple) and arguments and isinstance(value, (list, tuple)):
        items = [build_value(item, arguments[0], f"{key}[{index}]") for index, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is typing.Union:
        dataclass_options = [option for option in arguments if dataclasses.is_dataclass(option)]
        if len(dataclass_options) == 1:
            return build_value(value, dataclass_options[0], key)
        given = [option for option in arguments if option is not type(None)]
        if len(given) == 1:  # Optional[list[...]]
            return build_value(value, given[0], key)
    return value


def build_dataclass(value: Namespace | dict, cls: type, key: str) -> Any:
    items = dict(value.items(branches=True, nested=False)) if isinstance(value, Namespace) else dict(value)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    arguments = {name: build_value(item, hints.get(name), f"{key}.{name}") for name, item in items.items() if name in fields}
    try:
        return cls(**arguments)
    except UserError:
        raise
    except (ValueError, TypeError) as error:
        raise config_error(key, first_line(error)) from error


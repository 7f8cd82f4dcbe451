"""Protocol files: one config file with a section per subcommand (fit, predict, test), such as
configs/protocols/styleid.yaml; each subcommand gets only its own section."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from diffstyler.cli.command_line import SUBCOMMANDS
from diffstyler.errors import UserError

def protocol_stage(args: list[str], subcommand: str) -> list[str]:
    """Each `--config FILE` where FILE holds a section per subcommand (a protocol such as
    configs/protocols/styleid.yaml) replaced by `--config <FILE's section>` right after the
    subcommand: `diffstyler fit --config P` and `diffstyler --config P fit` both run P's fit.

    LightningCLI builds one module pair for all its subcommands, so it would check every section
    of such a file against this subcommand's classes and refuse the other stages' keys. The
    section goes inline as YAML (jsonargparse reads a config string as a file). The ranks that
    DDP starts run `main` on the original command line, and so pick the same section.
    """
    if subcommand not in args:
        return args
    kept, stages = [], []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--config" and index + 1 < len(args):
            file, width = args[index + 1], 2
        elif arg.startswith("--config="):
            file, width = arg.split("=", 1)[1], 1
        else:
            kept.append(arg)
            index += 1
            continue
        section = protocol_section(file, subcommand)
        if section is None:
            kept += args[index : index + width]
        else:
            stages += ["--config", section]
        index += width
    position = kept.index(subcommand) + 1
    return kept[:position] + stages + kept[position:]


def protocol_section(file: str, subcommand: str) -> Optional[str]:
    """The subcommand's section of `file` as YAML when the file is a protocol (a subcommand's name
    among its top-level keys), else None (a plain config, or one LightningCLI will report)."""
    try:
        top = yaml.safe_load(Path(file).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(top, dict) or not any(name in top for name in SUBCOMMANDS):
        return None
    if not isinstance(top.get(subcommand), dict):
        stages = ", ".join(name for name in SUBCOMMANDS if name in top)
        raise UserError(f"no {subcommand} section", file, f"this protocol file has sections {stages}; add {subcommand}:")
    return yaml.safe_dump(top[subcommand], sort_keys=False)

"""`diffstyler compare --config PROTOCOL`: every method of a protocol file on the same pairs, one table.

The protocol file (configs/protocols/styleid.yaml) names its methods (`methods`: DiffStyler, whose
stages are the file's sections, and StyleID, which changes predict's styles to the style images and
has no fit) and has a `compare` section (`CompareSettings`). The command runs, each as a `diffstyler`
process of its own (its own memory, its own GPUs with DDP), every stage that resumes where a rerun
left off:

1. each method's fit, where it has one, and its predict (`diffstyler <stage> --config PROTOCOL
   --method <method>`);
2. one `diffstyler test` of every method's results (the protocol's test section, `data.results`
   every method's folder, `model.output` `<compare.output>/evaluation`): one set of feature
   networks, one metrics.json with an entry per method;

then writes the table and the grid (`evaluation.comparison`). `--report-only` runs no stage: it
writes the table and the grid from what the stages wrote. A stage that fails stops the command
(its own error line is above ours); a predict whose jobs partly failed (status 1) does not: the
table counts what each method scored.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from diffstyler.cli.config_files import METHOD_OPTION, is_protocol, protocol_methods, protocol_section, read_config_file
from diffstyler.cli.status import JOBS_FAILED_STATUS
from diffstyler.errors import UserError

COMPARE_KEY = "compare"
EVALUATION_FOLDER = "evaluation"


@dataclass(frozen=True)
class CompareSettings:
    """A protocol's `compare` section.

    Args:
        output: the folder of the table (comparison.md, comparison.csv), the grid
            (comparison_grid.png) and the scores of every method (evaluation/metrics.json).
        grid_pairs: how many pairs the grid shows, evenly spaced over the pairs every method has.
    """

    output: str
    grid_pairs: int = 8


@dataclass(frozen=True)
class ComparisonPlan:
    """What `diffstyler compare` runs and reads for a protocol file."""

    protocol: str
    values: dict[str, Any]  # what the protocol file holds
    settings: CompareSettings
    methods: list[str]
    folders: list[str]  # each method's predict output folder

    @property
    def evaluation(self) -> str:
        return str(Path(self.settings.output) / EVALUATION_FOLDER)

    def stage_commands(self) -> list[list[str]]:
        """The `diffstyler` command lines of every stage, in order (without the program's name)."""
        changes = protocol_methods(self.values, self.protocol)
        commands = []
        for method in self.methods:
            for stage in ("fit", "predict"):
                if stage in self.values and changes[method].get(stage, {}) is not None:
                    commands.append([stage, "--config", self.protocol, METHOD_OPTION, method])
        commands.append(["test", "--config", self.protocol, METHOD_OPTION, self.methods[0],
                         "--data.results", json.dumps(self.folders), "--model.output", self.evaluation])
        return commands


def comparison_plan(protocol: str) -> ComparisonPlan:
    """The plan of a protocol file, every key it needs checked (one line naming it) before anything runs."""
    values = read_config_file(protocol)
    if not is_protocol(values):
        raise UserError("not a protocol file", protocol, "give a file with a section per stage (configs/protocols/styleid.yaml)")
    methods = list(protocol_methods(values, protocol))
    if len(methods) < 2:
        raise UserError("nothing to compare", protocol, f"its methods are {', '.join(methods) or 'none'}; name two or more under methods:")
    settings = compare_settings(values.get(COMPARE_KEY), protocol)
    folders = [predict_folder(protocol_section(values, protocol, "predict", method), protocol, method) for method in methods]
    if len(set(folders)) < len(folders):
        raise UserError("two methods write to one folder", protocol, f"give each method its own predict model.output.folder ({', '.join(folders)})")
    return ComparisonPlan(protocol, values, settings, methods, folders)


def compare_settings(section: Any, protocol: str) -> CompareSettings:
    if not isinstance(section, dict):
        raise UserError(f"no {COMPARE_KEY} section", protocol, f"add {COMPARE_KEY}: {{output: <folder>}} (grid_pairs: how many pairs the grid shows)")
    known = {field.name for field in fields(CompareSettings)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise UserError(f"unknown key {COMPARE_KEY}.{unknown[0]}", protocol, f"{COMPARE_KEY} takes {', '.join(sorted(known))}")
    if not isinstance(section.get("output"), str) or not section["output"]:
        raise UserError(f"no {COMPARE_KEY}.output", protocol, "give the folder of the comparison")
    pairs = section.get("grid_pairs", CompareSettings.grid_pairs)
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 0:
        raise UserError(f"invalid {COMPARE_KEY}.grid_pairs", protocol, f"must be a whole number >= 0, got {pairs!r}")
    return CompareSettings(output=section["output"], grid_pairs=pairs)


def predict_folder(section: dict[str, Any], protocol: str, method: str) -> str:
    folder = ((section.get("model") or {}).get("output") or {}).get("folder")
    if not isinstance(folder, str) or not folder:
        raise UserError(f"no predict model.output.folder for method {method}", protocol, "the comparison reads each method's results there")
    return folder


def run_stage(command: list[str]) -> int:
    """`diffstyler <command>` as a process of its own, its output shown as it comes; its exit status."""
    print(f"diffstyler compare: diffstyler {' '.join(command)}", file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "diffstyler.cli", *command], check=False).returncode


def run_stages(plan: ComparisonPlan) -> None:
    for command in plan.stage_commands():
        status = run_stage(command)
        if status == JOBS_FAILED_STATUS and command[0] == "predict":
            print(f"diffstyler compare: some jobs of {' '.join(command[:4])} failed; the table counts what each method scored",
                  file=sys.stderr)
        elif status != 0:
            raise UserError(f"diffstyler {command[0]} {METHOD_OPTION} {command[4]} ended with status {status}", plan.protocol,
                            "its error is above; what it finished is kept, so the same command goes on from there")


def compare(protocol: str, report_only: bool = False) -> tuple[str, str]:
    """Run the protocol's stages (unless `report_only`) and write the comparison; returns its table
    and its folder."""
    plan = comparison_plan(protocol)
    if not report_only:
        run_stages(plan)
    from diffstyler.evaluation.comparison import MethodRun, write_comparison  # torch: once the file checks out
    from diffstyler.evaluation.report import METRICS_NAME

    runs = [MethodRun(method, folder) for method, folder in zip(plan.methods, plan.folders)]
    table = write_comparison(plan.settings.output, runs, str(Path(plan.evaluation) / METRICS_NAME), plan.settings.grid_pairs)
    return table, plan.settings.output

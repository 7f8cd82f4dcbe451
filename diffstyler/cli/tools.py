"""Subcommands that are not a Lightning stage, each a plain argparse command:

    diffstyler export --lora outputs/lora_mine --format kohya --output mine.safetensors
    diffstyler export --lora outputs/lora_flux --format comfyui --output mine_flux.safetensors
    diffstyler demo --config configs/smoke/demo.yaml       # a Gradio page (pip install -e ".[demo]")
    diffstyler compare --config configs/protocols/styleid.yaml   # DiffStyler and StyleID: one table

`TOOLS` maps a name to its function(argv) -> exit status. Their errors are one line like the
Lightning subcommands' (`diffstyler <tool>: error: <what> (<where>): <why>`, status 2).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffstyler export", allow_abbrev=False, description=export.__doc__)
    parser.add_argument("--lora", required=True, help="a LoRA folder from `diffstyler fit`, or its .safetensors file")
    parser.add_argument("--format", default="kohya", help="the layout to write: kohya (every family; A1111, Forge, ComfyUI, "
                                                          "sd-scripts) or comfyui (SD 3.5 and FLUX.1: ComfyUI's own)")
    parser.add_argument("--output", required=True, help="the .safetensors file to write")
    parser.add_argument("--name", default=None, help="the LoRA's name in A1111 (ss_output_name; default: the output's stem)")
    return parser


def export(argv: list[str]) -> int:
    """A LoRA from `diffstyler fit` in the layout other tools load: kohya's (A1111, A1111-Forge, ComfyUI,
    kohya's sd-scripts; every family) or ComfyUI's own (SD 3.5 and FLUX.1)."""
    arguments = export_parser().parse_args(argv)
    from diffstyler.export import export_lora  # torch and safetensors: only once the arguments parse
    from diffstyler.outputs import a1111_lora_hash

    written = export_lora(arguments.lora, arguments.format, arguments.output, arguments.name)
    print(f"diffstyler export: {arguments.format} LoRA written to {written} (A1111 hash {a1111_lora_hash(written)})", file=sys.stderr)
    return 0


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffstyler demo", allow_abbrev=False, description=demo.__doc__)
    parser.add_argument("--config", default=None, help="a demo YAML file (configs/demo.yaml; configs/smoke/demo.yaml for the tiny model)")
    parser.add_argument("--host", default=None, help="the address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=None, help="the port to serve on (default 7860)")
    return parser


def demo(argv: list[str]) -> int:
    """DiffStyler in the browser: a Gradio page served on this machine until Ctrl-C."""
    arguments = demo_parser().parse_args(argv)
    from diffstyler.demo import require_gradio

    require_gradio()  # before the model loads: a missing extra is one line in a second
    from diffstyler.demo.config import read_demo_config  # torch and diffusers: only once the extra is there
    from diffstyler.demo.page import serve

    serve(read_demo_config(arguments.config, host=arguments.host, port=arguments.port))
    return 0


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffstyler compare", allow_abbrev=False, description=compare.__doc__)
    parser.add_argument("--config", required=True, help="a protocol file with methods and a compare section "
                                                        "(configs/protocols/styleid.yaml; configs/smoke/protocols/styleid.yaml)")
    parser.add_argument("--report-only", action="store_true", help="run no stage: write the table and the grid from "
                                                                   "what the stages wrote")
    return parser


def compare(argv: list[str]) -> int:
    """Every method of a protocol on the same pairs (DiffStyler: fit, then predict; StyleID: predict
    from the style images), scored by one `diffstyler test`: one table (the scores, seconds per
    image, style preparation) and a side-by-side grid in the protocol's compare.output."""
    arguments = compare_parser().parse_args(argv)
    from diffstyler.cli.compare import compare as run_comparison

    table, folder = run_comparison(arguments.config, arguments.report_only)
    print(table, end="")
    print(f"diffstyler compare: the table, its notes and the grid in {folder}", file=sys.stderr)
    return 0


TOOLS: dict[str, Callable[[list[str]], int]] = {"export": export, "demo": demo, "compare": compare}
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {"export": export_parser, "demo": demo_parser,
                                                             "compare": compare_parser}  # for the docs' tests

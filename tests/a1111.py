"""A faithful copy of how AUTOMATIC1111/stable-diffusion-webui reads the `parameters` text of a PNG,
for tests that check ours reads back in A1111 exactly."""

from __future__ import annotations

import json
import re

# A faithful copy of how AUTOMATIC1111/stable-diffusion-webui reads the `parameters` text:
# modules/infotext_utils.py (commit 036500223de0a3caaa86360a8ad3ed301e4367b0): `re_param`,
# `re_imagesize`, `unquote` and `parse_generation_parameters` up to the settings (the defaults it then
# fills in, the styles and the hypernet are left out); extensions-builtin/Lora/scripts/lora_script.py:
# `re_lora` and `infotext_pasted`'s reading of "Lora hashes"; modules/extra_networks.py: `re_extra_net`.

A1111_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
A1111_RE_LORA = re.compile("<lora:([^:]+):")
A1111_RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")


def a1111_unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def a1111_parse_generation_parameters(x: str) -> dict:
    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(A1111_RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    for k, v in A1111_RE_PARAM.findall(lastline):
        if not v:
            continue  # A1111: v[0] raises IndexError, caught: it prints "Error parsing ..." and skips the field
        if v[0] == '"' and v[-1] == '"':
            v = a1111_unquote(v)
        m = A1111_RE_IMAGESIZE.match(v)
        if m is not None:
            res[f"{k}-1"] = m.group(1)
            res[f"{k}-2"] = m.group(2)
        else:
            res[k] = v
    return res


def a1111_lora_hashes(field: str) -> dict[str, str]:
    hashes = [x.strip().split(":", 1) for x in field.split(",")]
    return {x[0].strip().replace(",", ""): x[1].strip() for x in hashes}

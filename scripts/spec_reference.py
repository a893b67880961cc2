"""Generate the README's job spec reference from JobSpec's JSON schema.

Run `python scripts/spec_reference.py --write` after changing normcore/spec.py; a test fails when
the README's section is out of date.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[1] / "README.md"
START = "<!-- spec-reference:start -->"
END = "<!-- spec-reference:end -->"


def _type(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in prop:
        return "object"
    if "enum" in prop:
        return " \\| ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    if "anyOf" in prop:
        return " or ".join(_type(p, defs) for p in prop["anyOf"])
    kind = prop.get("type", "any")
    if kind == "array" and "prefixItems" in prop:
        return "[" + ", ".join(_type(p, defs) for p in prop["prefixItems"]) + "]"
    return str(kind)


def _limits(prop: dict[str, Any]) -> str:
    parts = []
    for key, sym in (
        ("minimum", ">="),
        ("exclusiveMinimum", ">"),
        ("maximum", "<="),
        ("exclusiveMaximum", "<"),
        ("minLength", "len >="),
        ("maxLength", "len <="),
    ):
        for candidate in [prop, *prop.get("anyOf", [])]:
            if key in candidate:
                parts.append(f"{sym} {candidate[key]}")
    return ", ".join(dict.fromkeys(parts))


def render() -> str:
    """The markdown tables, one per section of the spec."""
    from normcore.spec import spec_json_schema

    schema = spec_json_schema()
    defs = schema.get("$defs", {})
    sections: list[tuple[str, dict[str, Any]]] = [("top level", schema)]
    for key, prop in schema["properties"].items():
        ref = prop.get("$ref") or next((p.get("$ref") for p in prop.get("anyOf", [])), None)
        if ref:
            sections.append((key, defs[ref.rsplit("/", 1)[-1]]))
    lines: list[str] = []
    for title, section in sections:
        required = set(section.get("required", []))
        lines += [
            f"**{title}**",
            "",
            "| field | type | default | limits | meaning |",
            "|---|---|---|---|---|",
        ]
        for name, prop in section["properties"].items():
            if name in required:
                default = "required"
            elif "default" in prop:
                default = json.dumps(prop["default"])
            else:
                default = "its defaults"
            desc = prop.get("description", "").replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| `{name}` | {_type(prop, defs)} | {default} | {_limits(prop)} | {desc} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    """Print the reference, or write it into the README between its markers with --write."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    text = render()
    if not args.write:
        sys.stdout.write(text)
        return 0
    readme = README.read_text()
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{text}{END}{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

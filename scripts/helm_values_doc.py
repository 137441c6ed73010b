"""The Helm chart's values documentation, bitnami style: every value in values.yaml carries a
`## @param <path> <description>` comment, grouped by `## @section <title>`, and the chart's README
holds the tables generated from them between the `values-table` markers.

Usage: helm_values_doc.py --check   (fails on an undocumented value, a stray @param or a stale README)
       helm_values_doc.py --write   (regenerates the README tables)
"""

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "crm"
START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"
PARAM = re.compile(r"^\s*## @param (\S+)\s+(.+?)\s*$")
SECTION = re.compile(r"^\s*## @section (.+?)\s*$")


@dataclass
class Section:
    title: str
    params: list[tuple[str, str]] = field(default_factory=list)


def parse_comments(text: str) -> list[Section]:
    sections: list[Section] = []
    for line in text.splitlines():
        if match := SECTION.match(line):
            sections.append(Section(match.group(1)))
        elif match := PARAM.match(line):
            if not sections:
                raise ValueError(f"@param {match.group(1)} comes before any @section")
            sections[-1].params.append((match.group(1), match.group(2)))
    return sections


def leaves(values: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths of every value: scalars, lists and empty maps; non-empty maps are walked."""
    if isinstance(values, dict) and values:
        found: dict[str, Any] = {}
        for key, value in values.items():
            found |= leaves(value, f"{prefix}{key}.")
        return found
    return {prefix.rstrip("."): values}


def problems(sections: list[Section], defaults: dict[str, Any]) -> list[str]:
    documented = [path for section in sections for path, _ in section.params]
    found = [f"value {path} has no `## @param`" for path in defaults if path not in documented]
    found += [f"@param {path} names no value in values.yaml" for path in documented if path not in defaults]
    found += [f"@param {path} is documented twice" for path in set(documented) if documented.count(path) > 1]
    return found


def render_tables(sections: list[Section], defaults: dict[str, Any]) -> str:
    lines: list[str] = []
    for section in sections:
        lines += [f"### {section.title}", "", "| Name | Description | Value |", "| --- | --- | --- |"]
        for path, description in section.params:
            value = json.dumps(defaults.get(path), ensure_ascii=False).replace("|", "\\|")
            text = description.replace("|", "\\|")
            lines.append(f"| `{path}` | {text} | `{value}` |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def updated_readme(readme: str, tables: str) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README.md lacks the {START} / {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{tables}{END}{tail}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true")
    mode.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)

    text = (CHART / "values.yaml").read_text()
    sections = parse_comments(text)
    defaults = leaves(yaml.safe_load(text))
    errors = problems(sections, defaults)
    readme_path = CHART / "README.md"
    readme = readme_path.read_text()
    expected = updated_readme(readme, render_tables(sections, defaults))
    if args.write:
        readme_path.write_text(expected)
    elif expected != readme:
        errors.append(f"{readme_path} is stale: run `python scripts/helm_values_doc.py --write`")
    for error in errors:
        print(f"ERROR {error}", file=sys.stderr)
    count = sum(len(section.params) for section in sections)
    print(f"values documentation: {count} parameters in {len(sections)} sections, {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

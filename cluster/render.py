"""Fills a cluster or deployment template (cluster/aws.yaml, infra/mlflow/k8s.yaml) with Terraform's outputs.

    terraform -chdir=infra/terraform output -json | python cluster/render.py cluster/aws.yaml \\
        --set image_tag=$TAG -o ~/.config/alexnet-ray/aws.yaml

A value "${name}" in the template is Terraform's output `name` (infra/terraform/outputs.tf), or a `--set
name=value` (which also overrides an output). A value that is a placeholder alone becomes the output's value
as Terraform gives it (a list stays a list); one inside a longer string takes the value's text. Comments are
not read. Nothing is written while a placeholder has no value (an output Terraform left null, such as
mlflow_role_arn without IRSA, counts as none): the error names them all, so no "${...}" reaches a cluster.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

PLACEHOLDER = re.compile(r"\$\{([a-z][a-z0-9_]*)\}")
HEADER = "# Rendered by cluster/render.py from {template} and Terraform's outputs: edit the template, not this file.\n"


def placeholders(node: Any) -> set[str]:
    """The names of every placeholder in a loaded document's keys and values."""
    if isinstance(node, dict):
        return set().union(*(placeholders(k) | placeholders(v) for k, v in node.items()))
    if isinstance(node, list):
        return set().union(*(placeholders(v) for v in node))
    return set(PLACEHOLDER.findall(node)) if isinstance(node, str) else set()


def terraform_values(output_json: str) -> dict[str, Any]:
    """`terraform output -json` ({name: {"value": ..., "type": ..., "sensitive": ...}}) as {name: value}."""
    return {name: output["value"] for name, output in json.loads(output_json).items()}


def _fill(node: Any, values: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        return {_fill(k, values): _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    if not isinstance(node, str):
        return node
    whole = PLACEHOLDER.fullmatch(node)
    if whole:
        return values[whole.group(1)]

    def text(match: re.Match) -> str:
        value = values[match.group(1)]
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"${{{match.group(1)}}} is a {type(value).__name__}; it cannot stand inside {node!r}")
        return str(value)

    return PLACEHOLDER.sub(text, node)


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # the same subnet list in every node type: no &id001 anchors
        return True


def render(template: str, values: dict[str, Any], name: str = "the template") -> str:
    """The template's documents with every placeholder filled, as YAML; ValueError naming every placeholder
    that has no value."""
    documents = list(yaml.safe_load_all(template))
    known = {k for k, v in values.items() if v is not None}
    missing = sorted(set().union(*(placeholders(d) for d in documents)) - known)
    if missing:
        raise ValueError(
            f"{name}: no value for {', '.join(missing)} (not among Terraform's outputs, or null there; "
            "apply with the variables that make them, or pass --set NAME=VALUE)"
        )
    filled = [_fill(d, values) for d in documents]
    body = yaml.dump_all(filled, Dumper=_Dumper, sort_keys=False, width=1000, explicit_start=len(filled) > 1)
    return HEADER.format(template=name) + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("template", type=Path)
    parser.add_argument("--outputs", type=Path, help="`terraform output -json` saved to a file (default: stdin)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a value of your own")
    parser.add_argument("-o", "--output", type=Path, help="where to write (default: stdout)")
    args = parser.parse_args(argv)

    values = terraform_values(args.outputs.read_text() if args.outputs else sys.stdin.read())
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep:
            parser.error(f"--set {pair}: expected NAME=VALUE")
        values[key] = value
    try:
        text = render(args.template.read_text(), values, name=str(args.template))
    except ValueError as e:
        print(f"render: {e}", file=sys.stderr)
        return 1
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

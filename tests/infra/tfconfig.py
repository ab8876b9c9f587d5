"""infra/terraform read offline: parsed blocks, the reference graph, and real Terraform
evaluation of the parts that depend on variables only.

No provider can be downloaded here, so `terraform validate/plan` cannot run. Two things
still can: python-hcl2 parses every file (the graph below is built from it), and
`terraform console` evaluates expressions in a folder that declares no provider. The
console harness copies variables.tf and the locals an expression needs into a temporary
folder and lets Terraform itself evaluate them, so validations, `min()`, `templatefile()`
and conditionals are Terraform's, not a re-implementation.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import hcl2

REPO_ROOT = Path(__file__).resolve().parents[2]
TERRAFORM_DIR = REPO_ROOT / "infra" / "terraform"

_METADATA_KEYS = {"__comments__", "__is_block__", "__inline_comments__"}

# Values for the variables without a default, so the console can start.
REQUIRED_VARIABLES: dict[str, Any] = {
    "prefix": "cswap",
    "project_id": "comfyswap-test",
    "runner_image": "us-central1-docker.pkg.dev/comfyswap-test/cswap-images/runner:v1",
    "secret_values": {},
}


def unquote(value: str) -> str:
    """python-hcl2 keeps the quotes of labels and string literals."""
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value


def without_metadata(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: without_metadata(value) for key, value in node.items() if key not in _METADATA_KEYS}
    if isinstance(node, list):
        return [without_metadata(item) for item in node]
    return node


def walk_strings(node: Any) -> list[str]:
    """Every string (expressions included) inside a parsed tree, keys and values."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [text for key, value in node.items() for text in (*walk_strings(key), *walk_strings(value))]
    if isinstance(node, list):
        return [text for item in node for text in walk_strings(item)]
    return []


def parse_file(path: Path) -> dict[str, Any]:
    """One .tf file, without python-hcl2's comment and block markers (comments are not code)."""
    with path.open() as handle:
        parsed: dict[str, Any] = without_metadata(hcl2.load(handle))
    return parsed


def parse_dir(directory: Path = TERRAFORM_DIR) -> dict[str, dict[str, Any]]:
    return {path.name: parse_file(path) for path in sorted(directory.glob("*.tf"))}


@cache
def parsed_config() -> dict[str, dict[str, Any]]:
    return parse_dir()


# --- the reference graph ---------------------------------------------------------------


@dataclass
class Graph:
    """Terraform's dependency graph at block level: one node per resource, data source,
    local value, variable and output; an edge for every reference in the block's body
    (arguments, nested blocks, ``count``/``for_each``, ``depends_on``, ``lifecycle``
    conditions) and for every argument of a ``templatefile()`` call, as Terraform draws it."""

    nodes: dict[str, Any] = field(default_factory=dict)  # address -> parsed body
    edges: dict[str, set[str]] = field(default_factory=dict)  # address -> referenced addresses
    kinds: dict[str, str] = field(default_factory=dict)  # address -> resource/data/local/variable/output

    def body(self, address: str) -> Any:
        return self.nodes[address]

    def cycles(self) -> list[list[str]]:
        """Strongly connected components with more than one node (or a self edge)."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []
        counter = [0]

        def visit(start: str) -> None:
            # Iterative Tarjan: the graph is small, but recursion depth is not ours to bet on.
            work: list[tuple[str, Iterable[str]]] = [(start, iter(sorted(self.edges.get(start, ()))))]
            index[start] = low[start] = counter[0]
            counter[0] += 1
            stack.append(start)
            on_stack.add(start)
            while work:
                node, children = work[-1]
                advanced = False
                for child in children:
                    if child not in index:
                        index[child] = low[child] = counter[0]
                        counter[0] += 1
                        stack.append(child)
                        on_stack.add(child)
                        work.append((child, iter(sorted(self.edges.get(child, ())))))
                        advanced = True
                        break
                    if child in on_stack:
                        low[node] = min(low[node], index[child])
                if advanced:
                    continue
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in self.edges.get(node, ()):
                        found.append(sorted(component))

        for node in sorted(self.nodes):
            if node not in index:
                visit(node)
        return found

    def cycle_path(self, component: list[str]) -> list[str]:
        """One concrete loop through a component, for a readable failure message."""
        members = set(component)
        start = component[0]
        path = [start]
        seen = {start}
        node = start
        while True:
            nexts = sorted(edge for edge in self.edges.get(node, ()) if edge in members)
            back = [edge for edge in nexts if edge == start]
            if back and len(path) > 1:
                return [*path, start]
            unseen = [edge for edge in nexts if edge not in seen]
            if not unseen:
                return [*path, nexts[0] if nexts else start]
            node = unseen[0]
            seen.add(node)
            path.append(node)

    def reaches(self, start: str, target: str, *, through: set[str] | None = None) -> bool:
        """Whether ``target`` is reachable from ``start``; ``through`` limits the kinds of
        intermediate nodes followed (e.g. only locals)."""
        pending = [start]
        seen = {start}
        while pending:
            node = pending.pop()
            for child in self.edges.get(node, ()):
                if child == target:
                    return True
                if child in seen:
                    continue
                seen.add(child)
                if through is None or self.kinds.get(child) in through:
                    pending.append(child)
        return False


_RESOURCE_REF = re.compile(r"(?<![\w.\"/-])(data\.)?([a-z][a-z0-9]*_[a-z0-9_]+)\.([a-z_][a-z0-9_-]*)")
_SIMPLE_REF = re.compile(r"\b(var|local)\.([A-Za-z_][A-Za-z0-9_]*)")


def references(body: Any, declared: Mapping[str, str]) -> set[str]:
    """Addresses of declared blocks that an expression tree refers to."""
    found: set[str] = set()
    for text in walk_strings(body):
        for kind, name in _SIMPLE_REF.findall(text):
            address = f"{kind}.{name}"
            if address in declared:
                found.add(address)
        for data_prefix, type_name, name in _RESOURCE_REF.findall(text):
            address = f"{'data.' if data_prefix else ''}{type_name}.{name}"
            if address in declared:
                found.add(address)
    return found


def build_graph(parsed: Mapping[str, dict[str, Any]] | None = None) -> Graph:
    parsed = parsed if parsed is not None else parsed_config()
    graph = Graph()
    for tree in parsed.values():
        for block in tree.get("resource", []):
            for type_label, named in block.items():
                for name_label, body in named.items():
                    address = f"{unquote(type_label)}.{unquote(name_label)}"
                    graph.nodes[address], graph.kinds[address] = body, "resource"
        for block in tree.get("data", []):
            for type_label, named in block.items():
                for name_label, body in named.items():
                    address = f"data.{unquote(type_label)}.{unquote(name_label)}"
                    graph.nodes[address], graph.kinds[address] = body, "data"
        for block in tree.get("locals", []):
            for name, value in block.items():
                graph.nodes[f"local.{name}"], graph.kinds[f"local.{name}"] = value, "local"
        for kind, prefix in (("variable", "var"), ("output", "output")):
            for block in tree.get(kind, []):
                for label, body in block.items():
                    address = f"{prefix}.{unquote(label)}"
                    graph.nodes[address], graph.kinds[address] = body, kind
    for address, body in graph.nodes.items():
        graph.edges[address] = references(body, graph.kinds) - {address}
        if address in references(body, graph.kinds) and graph.kinds[address] == "local":
            graph.edges[address].add(address)  # a local that names itself is a cycle too
    return graph


# --- templates -------------------------------------------------------------------------


_TEMPLATEFILE = re.compile(r'templatefile\("\$\{path\.module\}/([^"]+)",\s*\{')


def templatefile_calls(graph: Graph) -> list[tuple[str, str, list[str]]]:
    """(address of the calling block, template path, argument names) of every call."""
    return [
        (address, template, list(arguments)) for address, template, arguments in templatefile_arguments(graph)
    ]


def templatefile_arguments(graph: Graph) -> list[tuple[str, str, dict[str, str]]]:
    """(address of the calling block, template path, {argument: expression}) of every call."""
    calls: list[tuple[str, str, dict[str, str]]] = []
    for address, body in graph.nodes.items():
        for text in walk_strings(body):
            for match in _TEMPLATEFILE.finditer(text):
                calls.append((address, match.group(1), object_items(_balanced(text, match.end() - 1))))
    return calls


def object_items(constructor: str) -> dict[str, str]:
    """``a = x, b = f(y, z)`` (the inside of an object constructor) -> {a: x, b: f(y, z)}."""
    items: dict[str, str] = {}
    depth = 0
    in_string = False
    start = 0
    parts: list[str] = []
    for position, char in enumerate(constructor):
        if char == '"' and (position == 0 or constructor[position - 1] != "\\"):
            in_string = not in_string
        elif in_string:
            continue
        elif char in "{[(":
            depth += 1
        elif char in "}])":
            depth -= 1
        elif depth == 0 and char in ",\n":
            parts.append(constructor[start:position])
            start = position + 1
    parts.append(constructor[start:])
    for part in parts:
        name, equals, expression = part.partition("=")
        if equals and re.fullmatch(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*", name):
            items[name.strip()] = expression.strip()
    return items


def map_entry(text: str, name: str) -> str | None:
    """The expression of ``name = ...`` in any object constructor within ``text``."""
    for start, char in enumerate(text):
        if char == "{" and re.search(rf"\b{name}\s*=", text[start:]):
            try:
                items = object_items(_balanced(text, start))
            except ValueError:
                continue
            if name in items:
                return items[name]
    return None


def _balanced(text: str, start: int) -> str:
    """The ``{...}`` starting at ``start`` (braces inside strings are rare enough here)."""
    depth = 0
    for position in range(start, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : position]
    raise ValueError(f"unbalanced braces in {text[start : start + 80]!r}")


def template_references(template: str) -> set[str]:
    """Top-level names a Terraform template reads (interpolations and directives), minus
    the names its own ``for`` directives bind."""
    expressions = re.findall(r"\$\{([^}]*)\}", template) + re.findall(r"%\{~?\s*([^}]*?)~?\}", template)
    bound: set[str] = set()
    for expression in expressions:
        loop = re.match(r"for\s+([a-z_][a-z0-9_]*)(?:\s*,\s*([a-z_][a-z0-9_]*))?\s+in\s", expression)
        if loop:
            bound.update(name for name in loop.groups() if name)
    names: set[str] = set()
    for expression in expressions:
        without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
        for name in re.findall(r"(?<![\w.])([a-z_][a-z0-9_]*)\b(?!\s*\()", without_strings):
            names.add(name)
    keywords = {"for", "in", "if", "else", "endif", "endfor", "true", "false", "null"}
    return names - bound - keywords


# --- terraform console -------------------------------------------------------------------


def terraform_binary() -> str | None:
    return shutil.which("terraform")


def local_sources(directory: Path = TERRAFORM_DIR) -> dict[str, str]:
    """Source text of every local value, ``name = expression`` as written (fmt-aligned
    files: attributes of a ``locals`` block start at two spaces of indentation)."""
    sources: dict[str, str] = {}
    for path in sorted(directory.glob("*.tf")):
        lines = path.read_text().splitlines()
        inside = False
        current: str | None = None
        for line in lines:
            if re.match(r"^locals\s*\{\s*$", line):
                inside, current = True, None
                continue
            if inside and line == "}":
                inside, current = False, None
                continue
            if not inside:
                continue
            start = re.match(r"^  ([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
            if start:
                current = start.group(1)
                sources[current] = line.strip() + "\n"
            elif current is not None and not re.match(r"^  #", line):
                sources[current] += line + "\n"
    return sources


class VariableOnlyError(AssertionError):
    pass


def locals_closure(expressions: Iterable[str], graph: Graph | None = None) -> list[str]:
    """The local values the expressions need, refusing any that reach a resource or data
    source (those cannot be evaluated without a provider)."""
    graph = graph or build_graph()
    pending = [
        f"local.{name}"
        for expression in expressions
        for kind, name in _SIMPLE_REF.findall(expression)
        if kind == "local"
    ]
    needed: set[str] = set()
    while pending:
        address = pending.pop()
        if address in needed:
            continue
        if address not in graph.nodes:
            raise VariableOnlyError(f"{address} is not declared")
        needed.add(address)
        for child in graph.edges.get(address, ()):
            kind = graph.kinds[child]
            if kind == "local":
                pending.append(child)
            elif kind in {"resource", "data"}:
                raise VariableOnlyError(
                    f"{address} refers to {child}: keep limit-bearing locals variable-only"
                )
    return sorted(name.removeprefix("local.") for name in needed)


@dataclass
class ConsoleResult:
    returncode: int
    values: list[Any]
    stderr: str


def console(
    expressions: list[str],
    variables: Mapping[str, Any] | None = None,
    *,
    extra_files: Mapping[str, str] | None = None,
) -> ConsoleResult:
    """Evaluate ``jsonencode(expression)`` for each expression with real Terraform, given
    variables.tf, the locals the expressions need and ``variables`` (merged over
    REQUIRED_VARIABLES). A failing variable validation gives a non-zero return code."""
    binary = terraform_binary()
    if binary is None:
        raise RuntimeError("terraform is not on PATH")
    sources = local_sources()
    needed = locals_closure(expressions)
    with tempfile.TemporaryDirectory(prefix="tfconsole-") as folder:
        root = Path(folder)
        shutil.copy(TERRAFORM_DIR / "variables.tf", root / "variables.tf")
        shutil.copytree(TERRAFORM_DIR / "templates", root / "templates")
        if needed:
            (root / "locals.tf").write_text("locals {\n" + "".join(sources[name] for name in needed) + "}\n")
        for name, text in (extra_files or {}).items():
            (root / name).write_text(text)
        (root / "test.auto.tfvars.json").write_text(json.dumps({**REQUIRED_VARIABLES, **(variables or {})}))
        # Piped, the console prints only its last result: one list holds every expression.
        script = "jsonencode([" + ", ".join(expressions) + "])\n"
        options: dict[str, Any] = {"cwd": root, "input": script, "capture_output": True, "text": True}
        options["env"] = {
            "PATH": "/usr/bin:/bin",
            "TF_IN_AUTOMATION": "1",
            "HOME": folder,
            "CHECKPOINT_DISABLE": "1",
        }
        result = subprocess.run([binary, "console"], timeout=120, check=False, **options)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.stderr + result.stdout)
    # A failed validation is reported as an error, yet the console may still exit 0.
    returncode = result.returncode or (1 if re.search(r"^\W*Error: ", plain, flags=re.MULTILINE) else 0)
    values: list[Any] = []
    if returncode == 0:
        printed = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith('"')]
        values = list(json.loads(json.loads(printed[-1]))) if printed else []
    return ConsoleResult(returncode, values, plain)


def evaluate(expression: str, variables: Mapping[str, Any] | None = None) -> Any:
    result = console([expression], variables)
    if result.returncode != 0 or len(result.values) != 1:
        raise AssertionError(f"terraform console could not evaluate {expression!r}:\n{result.stderr[-3000:]}")
    return result.values[0]


def expression_of(value: Any) -> str:
    """A parsed attribute as a console expression: ``${x}`` -> ``x``; literals as HCL."""
    if isinstance(value, str):
        if value.startswith("${") and value.endswith("}") and value.count("${") == 1:
            return value[2:-1]
        if value.startswith('"'):
            return value
        return json.dumps(value)
    return json.dumps(value)

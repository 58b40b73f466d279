"""Import hygiene of the package, read from the source with `ast` (nothing is imported).

* No import cycles among jaxaccel's modules, counting imports inside functions too (a cycle
  hidden in a function is still a cycle).
* `jaxaccel.errors` imports nothing from jaxaccel, so every module can raise its errors.
* An import inside a function must say why it is deferred (a comment containing "deferred"
  on its line or just above it): only heavy or optional dependencies are imported late.
* No command module imports another command module (shared code lives outside commands/).
* Model code and the runtime never name the CPU backend's tricks.
"""

import ast
import pathlib
import re
import subprocess

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxaccel"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: pathlib.Path, name: str):
    """(imported jaxaccel module, line, inside a function) for every import in `path`."""
    tree = ast.parse(path.read_text())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from jaxaccel import x` imports the module jaxaccel.x when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            yield target, (node.lineno, node.end_lineno), id(node) in in_function


def graph() -> dict[str, set[str]]:
    edges = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in imported_modules(path, name):
            while target and target not in MODULES:  # `import jaxaccel.a.b` -> nearest module
                target = target.rpartition(".")[0]
            if target.startswith("jaxaccel") and target != name:
                edges[name].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_errors_imports_nothing_from_jaxaccel():
    assert graph()["jaxaccel.errors"] == set()


def _says_deferred(lines: list[str], index: int) -> bool:
    """'deferred' on the import's line or in the block of imports and comments above it."""
    while index >= 0:
        text = lines[index].strip()
        if "deferred" in text:
            return True
        if index != len(lines) and not (text == "" or text.startswith(("#", "import ", "from "))
                                        or text.endswith(",") or text.endswith(")")):
            return False
        index -= 1
    return False


def test_imports_inside_functions_say_why_they_are_deferred():
    unexplained = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for _, (first, last), in_function in imported_modules(path, name):
            if not in_function:
                continue
            if not any("deferred" in text for text in lines[first - 1:last]) and \
                    not _says_deferred(lines, first - 1):
                unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{first}")
    assert not unexplained, "imports inside functions without a 'deferred' reason: " + ", ".join(
        sorted(set(unexplained)))


def test_no_command_imports_another_command():
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("jaxaccel.cli.") and name not in ("jaxaccel.cli.options", "jaxaccel.cli.main"):
            others = {t for t in targets if t.startswith("jaxaccel.cli.")
                      and t not in ("jaxaccel.cli", "jaxaccel.cli.options", name)}
            assert not others, f"{name} imports {others}"


def test_model_code_and_runtime_name_no_cpu_trick():
    """The acceptance grep of the architecture issue: CPU-only code stays in backends/cpu."""
    found = subprocess.run(
        ["git", "grep", "-n", r"PackedWeight\|uint16\|optimization_barrier", "--", "jaxaccel",
         ":!jaxaccel/backends/cpu"], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert found.stdout == "", found.stdout


# The layers, lowest first: each package (or top-level module) and the packages it may import.
# An edge not listed here is a layering fault. `bench` sits outside the library's core graph:
# only the `bench` command reaches it.
BASE = {"errors", "utils"}
ALLOWED = {
    "errors": set(),
    "utils": {"errors"},
    "parallel": BASE,
    "backends": BASE | {"parallel"},
    "models": BASE | {"parallel", "backends"},
    "checkpoint": BASE | {"parallel"},
    "inputs": BASE,
    "conversion": BASE | {"parallel", "checkpoint", "models"},
    "runtime": BASE | {"parallel", "backends", "models", "inputs"},
    "engine": BASE | {"parallel", "backends", "models", "inputs", "runtime"},
    "startup": BASE | {"parallel", "backends", "models", "inputs", "checkpoint", "conversion",
                       "runtime", "engine"},
    "model": BASE | {"parallel", "models", "inputs", "runtime", "startup", "engine"},
    "api": BASE | {"parallel", "models", "checkpoint", "conversion", "startup", "model"},
    "serving": BASE | {"parallel", "models", "inputs", "runtime", "engine", "startup", "model"},
    "jaxaccel": BASE | {"api", "model"},
    "cli": BASE | {"parallel", "models", "inputs", "checkpoint", "conversion", "runtime",
                   "engine", "startup", "model", "api", "bench", "serving", "jaxaccel"},
    "bench": BASE | {"parallel", "backends", "models", "inputs", "checkpoint", "conversion",
                     "runtime", "engine", "startup", "model", "api", "cli", "jaxaccel"},
}


def layer_of(module: str) -> str:
    """jaxaccel.a.b -> "a"; a top-level module jaxaccel.m -> "m"; the package itself ->
    "jaxaccel"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "jaxaccel"


def layering_faults(edges: dict[str, set[str]]) -> list[str]:
    faults = []
    for name, targets in sorted(edges.items()):
        here = layer_of(name)
        for target in sorted(targets):
            there = layer_of(target)
            if there != here and there not in ALLOWED.get(here, set()):
                faults.append(f"{name} -> {target}")
    return faults


def test_layers_import_only_downwards():
    edges = graph()
    unknown = {layer_of(m) for m in edges} - set(ALLOWED)
    assert not unknown, f"packages with no place in ALLOWED: {sorted(unknown)}"
    faults = layering_faults(edges)
    assert not faults, "imports against the layering: " + ", ".join(faults)


def test_layering_check_catches_an_upward_import():
    assert layering_faults({"jaxaccel.backends.cpu": {"jaxaccel.models.kv_cache"}}) == [
        "jaxaccel.backends.cpu -> jaxaccel.models.kv_cache"]
    assert layering_faults({"jaxaccel.models.gpt2": {"jaxaccel.backends"}}) == []


def test_at_most_eight_top_level_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top


FAMILY_WORD = re.compile(r"\b(bert|gpt-?2|llama|resnet)\b", re.I)


def family_names_in_code(source: str) -> list[tuple[int, str]]:
    """(line, text) of every identifier or string literal naming a family; docstrings and
    comments (which may cite a measurement on a model) are not code."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                       ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value if id(node) not in docstrings else ""
        elif isinstance(node, ast.Name):
            text = node.id
        elif isinstance(node, ast.Attribute):
            text = node.attr
        elif isinstance(node, ast.alias):
            text = node.name
        else:
            continue
        if FAMILY_WORD.search(text.replace("_", " ")):
            found.append((getattr(node, "lineno", 0), text))
    return found


def test_no_module_outside_models_names_a_family():
    """Family names appear in code only under models/: everything else asks the registry
    (`jaxaccel.models`). bench/ compares against named reference models and is exempt."""
    faults = []
    for name, path in MODULES.items():
        if layer_of(name) in ("models", "bench"):
            continue
        for line, text in family_names_in_code(path.read_text()):
            faults.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {text[:60]!r}")
    assert not faults, "\n".join(faults)


def test_family_name_check_sees_code_not_docstrings():
    source = '"""Measured on GPT-2."""\nif family == "llama":\n    pass  # bert\n'
    assert family_names_in_code(source) == [(2, "llama")]

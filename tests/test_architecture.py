"""The package's shape: imports flow one way (no cycles between modules), functions import only heavy optional
dependencies lazily, no module is longer than 450 lines and no function longer than 80, and the configuration has
at most 50 fields. Read from the source with ast, so the checks see what a reader sees."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "hybvit"
# Imported inside functions on purpose: slow to import or optional, and needed only on some paths.
LAZY_OK = ("torchvision", "matplotlib", "tensorboard.backend", "sklearn", "scipy.io", "torch_fidelity")


def modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(name: str, path: Path) -> tuple[set[str], list[str]]:
    """(hybvit modules imported anywhere in the module, every import made inside a function as 'module')."""
    mods = modules()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top, inner = set(), []
    tree = ast.parse(path.read_text())
    in_function = {(n.lineno, n.col_offset) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            else:
                targets = [node.module]
        else:
            continue
        if (node.lineno, node.col_offset) in in_function:
            inner += targets
        top |= {t for t in targets if t in mods}
    return top, inner


def test_no_import_cycles():
    """An import inside a function counts too: deferring an import hides a cycle, it does not remove it."""
    graph = {}
    for name, path in modules().items():
        # importing a.b.c runs a.b's __init__ first, unless a.b is the importer's own (already running) package
        own = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)} | {name}
        graph[name] = {p for t in imports(name, path)[0] for p in [t] + [t.rsplit(".", k)[0] for k in
                                                                          range(1, t.count(".") + 1)]
                       if p not in own}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2
    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_a_cycle_is_detected(monkeypatch):
    """The cycle check can fail: a fake back edge from data to train is reported."""
    real = imports

    def with_back_edge(name, path):
        top, inner = real(name, path)
        return (top | {"hybvit.train"} if name == "hybvit.data" else top), inner
    monkeypatch.setitem(globals(), "imports", with_back_edge)
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "hybvit.train" in str(e) and "hybvit.data" in str(e)
    else:
        raise AssertionError("the back edge data -> train was not reported")


def test_functions_import_only_heavy_optional_dependencies():
    lazy = {f"{name}: {t}" for name, path in modules().items() for t in imports(name, path)[1]
            if not t.startswith(LAZY_OK)}
    assert not lazy, f"imports inside functions (move them to the top of the module): {sorted(lazy)}"


def test_modules_and_functions_stay_short():
    long_modules = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
                    if (n := len(p.read_text().splitlines())) > 450}
    long_functions = [f"{p.relative_to(SRC)}:{f.name} ({f.end_lineno - f.lineno + 1} lines)"
                      for p in SRC.rglob("*.py") for f in ast.walk(ast.parse(p.read_text()))
                      if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.end_lineno - f.lineno >= 80]
    assert long_modules == {} and long_functions == []


def test_the_configuration_has_at_most_50_fields():
    import dataclasses
    from hybvit.config import Config
    cfg = Config()
    sections = [getattr(cfg, s) for s in Config.SECTIONS]
    count = sum(len(dataclasses.fields(s)) for s in sections) + len(dataclasses.fields(Config)) - len(sections)
    assert count <= 50, count

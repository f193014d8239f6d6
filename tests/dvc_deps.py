"""The project files a DVC stage's command imports, computed from the code (test_dvc checks dvc.yaml against it).

    python tests/dvc_deps.py            # print each stage's missing and superfluous code deps
    python tests/dvc_deps.py --write    # rewrite dvc.yaml's code deps from the imports (data deps are kept)

A stage runs `python -m stages.<name>`; its import closure is every project module it imports, directly,
inside functions or through other modules, plus every module of a package whose registry imports its
modules itself (`Registry(kind, "promptcil.prompts")`: a new method is one new file, and DVC must see it)
or imports them lazily by name (`import_module(f"promptcil.tracking.{module}")`).
A folder whose every Python file is in the closure is listed as the folder.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"promptcil": REPO / "src" / "promptcil", "stages": REPO / "stages", "flows": REPO / "flows"}


def module_file(name: str) -> Path | None:
    """The file of a project module or package (None: not ours)."""
    top, *rest = name.split(".")
    if top not in ROOTS:
        return None
    path = ROOTS[top].joinpath(*rest)
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def module_name(path: Path) -> str:
    for top, root in ROOTS.items():
        if path.is_relative_to(root):
            parts = [top, *path.relative_to(root).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(path)


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of `path` may load (with its parent packages), and the modules of
    packages a registry there discovers."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Registry" and len(node.args) == 2
              and isinstance(node.args[1], ast.Constant)):
            names |= package_modules(node.args[1].value)
        elif (prefix := lazy_import_prefix(node)) is not None:
            # import_module(f"pkg.{name}") (promptcil.tracking's names): any module of that package
            names |= package_modules(prefix.rstrip("."))
    with_parents = set(names)
    for name in names:
        parts = name.split(".")
        with_parents |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return with_parents


def package_modules(package: str) -> set[str]:
    """Every module of a project package (none for a package not ours)."""
    init = module_file(package)
    return set() if init is None else {module_name(p) for p in init.parent.glob("*.py")}


def lazy_import_prefix(node: ast.AST) -> str | None:
    """"pkg." for a call import_module(f"pkg.{...}"), else None."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.JoinedStr)):
        return None
    if getattr(node.func, "id", getattr(node.func, "attr", None)) != "import_module":
        return None
    first = node.args[0].values[0] if node.args[0].values else None
    if isinstance(first, ast.Constant) and str(first.value).endswith("."):
        return str(first.value)
    return None


def closure(module: str) -> set[Path]:
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += sorted(imported_modules(path))
    return seen


def compress(files: set[Path]) -> list[str]:
    """Repository-relative deps: a folder when every Python file under it is needed."""
    deps: set[Path] = set(files)
    folders = sorted({f.parent for f in files}, key=lambda p: len(p.parts))
    for folder in folders:
        everything = set(folder.rglob("*.py"))
        if everything and everything <= files and not any(d in deps for d in folder.parents if d.is_dir()):
            deps = {d for d in deps if not d.is_relative_to(folder)} | {folder}
    return sorted(str(d.relative_to(REPO)) for d in deps)


def covered(path: Path, deps: list[str]) -> bool:
    return any(path == REPO / d or path.is_relative_to(REPO / d) for d in deps)


def stage_code_deps(stage: dict) -> list[str]:
    module = stage["cmd"].split(" -m ", 1)[1].split()[0]
    return compress(closure(module))


def check(dvc_file: Path = REPO / "dvc.yaml") -> dict[str, dict[str, list[str]]]:
    """Per stage: code files its command imports that no dep covers, and code deps it does not import."""
    report = {}
    for name, stage in yaml.safe_load(dvc_file.read_text())["stages"].items():
        deps = [d for d in stage.get("deps", []) if not d.startswith("outputs/")]
        needed = closure(stage["cmd"].split(" -m ", 1)[1].split()[0])
        missing = sorted(str(p.relative_to(REPO)) for p in needed if not covered(p, deps))
        superfluous = [d for d in deps if not any(p == REPO / d or p.is_relative_to(REPO / d) for p in needed)]
        report[name] = {"missing": missing, "superfluous": superfluous}
    return report


def write(dvc_file: Path = REPO / "dvc.yaml") -> None:
    """Replace each stage's code deps by its import closure, keeping data deps and the file's layout."""
    text = dvc_file.read_text()
    stages = yaml.safe_load(text)["stages"]
    lines = text.splitlines()
    out: list[str] = []
    stage = None
    skipping = False
    for line in lines:
        if line.startswith("  ") and not line.startswith("    ") and line.rstrip().endswith(":"):
            stage = line.strip().rstrip(":")
        if skipping:
            if line.startswith("      - ") and not line.strip()[2:].startswith("outputs/"):
                continue
            skipping = False
        out.append(line)
        if line.strip() == "deps:" and stage in stages:
            out += [f"      - {dep}" for dep in stage_code_deps(stages[stage])]
            skipping = True
    dvc_file.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    if "--write" in sys.argv:
        write()
    for stage, problems in check().items():
        if problems["missing"] or problems["superfluous"]:
            print(stage, problems)

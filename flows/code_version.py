"""The code version of a stage: its body's own source plus the computing modules it can reach.

Editing one stage's module recomputes that stage and its dependents only (Dagster's code_version per
asset). Imports are followed statically (ast), inside functions too, restricted to ``storage``,
``tasks`` and ``workers``; a body whose source cannot be read falls back to the whole tree's digest.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
import textwrap
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

# ---- code version ---------------------------------------------------------------------------
# The packages whose code computes stage outputs; flows only wires them.
COMPUTING_PACKAGES = ("storage", "tasks", "workers")

# Calls that import modules by a computed name: a module making one is taken to import every
# module of its package (storage.readers loads all readers this way).
_DYNAMIC_IMPORTS = {"import_module", "__import__", "iter_modules", "walk_packages"}

# CPython 3.11 keeps the AST converter's recursion depth in state shared by threads: two parses at
# once (Prefect runs ready stages in threads) can fail with "AST constructor recursion depth
# mismatch". Ours take turns; a clash with a parse elsewhere in the process is retried.
_PARSE_LOCK = threading.Lock()


def _parse(source: str | bytes) -> ast.Module:
    with _PARSE_LOCK:
        for _ in range(2):
            try:
                return ast.parse(source)
            except SystemError as e:
                if "recursion depth mismatch" not in str(e):
                    raise
        return ast.parse(source)


def _version() -> str:
    try:
        return metadata.version("fermine")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "dev"


def _is_computing(module: str | None) -> bool:
    return bool(module) and module.split(".", 1)[0] in COMPUTING_PACKAGES


@functools.lru_cache(maxsize=8)
def _module_files(packages: tuple[str, ...]) -> dict[str, Path]:
    """Every module of ``packages`` (dotted name -> file), found on disk without importing any."""
    files: dict[str, Path] = {}
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        for loc in spec.submodule_search_locations:
            root = Path(loc)
            for f in sorted(root.rglob("*.py")):
                rel = f.relative_to(root).with_suffix("").parts
                if any(not p.isidentifier() for p in rel):
                    continue  # not importable (e.g. a stray "foo-bar.py")
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                files.setdefault(".".join((pkg, *rel)), f)
    return files


def module_files() -> dict[str, Path]:
    """The computing packages' modules: dotted name -> source file."""
    return _module_files(tuple(COMPUTING_PACKAGES))


def read_module(name: str) -> bytes | None:
    """The source bytes of computing module ``name`` (None when there is no such module)."""
    f = module_files().get(name)
    return f.read_bytes() if f is not None else None


def _is_package(name: str) -> bool:
    f = module_files().get(name)
    return f is not None and f.name == "__init__.py"


@functools.lru_cache(maxsize=1024)
def module_imports(name: str, source: bytes) -> frozenset[str]:
    """The computing modules that module ``name`` may import, anywhere in its source (conservative).

    Import statements at top level and inside functions; ``from pkg import name`` counts
    ``pkg.name`` when that is a module; a string constant naming a module counts; a dynamic import
    (importlib/pkgutil) counts every module of the importing module's package.
    """
    known = module_files()
    try:
        tree = _parse(source)
    except SyntaxError:  # an unparsable module: everything it could reach
        return frozenset(known)
    package = name if _is_package(name) else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(p for p in (*parts, base) if p)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
            out.add(node.value)
        elif isinstance(node, (ast.Name, ast.Attribute)):
            ident = node.id if isinstance(node, ast.Name) else node.attr
            if ident in _DYNAMIC_IMPORTS and package:
                out.update(m for m in known if m == package or m.startswith(package + "."))
    return frozenset(m for m in out if m in known)


def reached_modules(roots: Iterable[str], read: Callable[[str], bytes | None] | None = None) -> list[str]:
    """``roots`` and every computing module they import, transitively, with the packages whose
    ``__init__`` runs on the way (sorted). ``read``: name -> source bytes, ``read_module`` by default."""
    read = read or read_module
    known = module_files()
    todo = [m for m in roots if m in known]
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parent = m.rpartition(".")[0]
        if parent:
            todo.append(parent)  # importing a.b runs a/__init__.py
        src = read(m)
        if src is not None:
            todo.extend(module_imports(m, src) - seen)
    return sorted(seen)


@dataclass(frozen=True)
class StageCode:
    """What a stage body runs: its own source (and that of the flow helpers it calls) and the
    computing modules it imports or refers to."""

    sources: tuple[tuple[str, str], ...]  # (qualified name, source text), sorted
    roots: frozenset[str]


def _bound_names(tree: ast.AST) -> set[str]:
    """Names a function's source binds itself (parameters, assignments, imports, defs): not globals."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            out.add(node.id)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in node.names)
    return out


def _free_loads(tree: ast.AST) -> set[str]:
    """Names a source reads and does not bind: the globals it may use. Annotations are skipped
    (types, not code that runs)."""
    loads: set[str] = set()

    def visit(node: ast.AST) -> None:
        for name, child in ast.iter_fields(node):
            if name in ("annotation", "returns"):
                continue
            for c in child if isinstance(child, list) else [child]:
                if isinstance(c, ast.AST):
                    if isinstance(c, ast.Name) and isinstance(c.ctx, ast.Load):
                        loads.add(c.id)
                    visit(c)

    visit(tree)
    return loads - _bound_names(tree)


@functools.lru_cache(maxsize=64)
def _import_map(module: str) -> dict[str, str]:
    """Module ``module``'s top-level imports: bound name -> the module it comes from. Lets a body's
    use of an imported constant (``MEAN`` from tasks.data) count, which the value's type would not."""
    try:
        tree = _parse(inspect.getsource(sys.modules[module]))
    except (KeyError, OSError, TypeError, SyntaxError):
        return {}
    out: dict[str, str] = {}

    def visit(node: ast.AST) -> None:
        for c in ast.iter_child_nodes(node):
            if isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            if isinstance(c, ast.Import):
                out.update({(a.asname or a.name.split(".")[0]): (a.name if a.asname else a.name.split(".")[0])
                            for a in c.names})
            elif isinstance(c, ast.ImportFrom) and not c.level and c.module:
                out.update({(a.asname or a.name): f"{c.module}.{a.name}" if f"{c.module}.{a.name}" in module_files()
                            else c.module for a in c.names})
            visit(c)

    visit(tree)
    return out


def _unwrap(fn: Any) -> Any:
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = inspect.unwrap(fn)
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)) and callable(fn):
        fn = type(fn)  # a callable object: its class's source
    return fn


def stage_code(fn: Any) -> StageCode | None:
    """The source a stage body runs and the computing modules it refers to; None when the source
    cannot be found (a builtin, a function made at run time).

    Starts from the body's own source (``inspect.getsource``): its import statements (the bodies
    import lazily) and the globals it names. A computing module, or a function, class or value
    defined in one, is a root; a function or class of the body's own module or of ``flows`` (a
    helper such as ``steps._ray``) is followed the same way, its source counted too. The
    closure's cells (what the factory handed it) count as named values.
    """
    fn = _unwrap(fn)
    home = getattr(fn, "__module__", None)
    roots: set[str] = set()
    sources: dict[str, str] = {}

    def refer(value: Any) -> None:
        """A value the stage body names: a computing module/object is a root, a flow helper is followed."""
        if inspect.ismodule(value):
            mod = value.__name__
        elif inspect.isfunction(value) or inspect.isclass(value):
            mod = getattr(value, "__module__", None)
            if not _is_computing(mod) and (mod == home or (mod or "").startswith("flows.")):
                follow(value)
                return
        else:  # data (a config, a section of the run config): only a computing type's module counts
            mod = type(value).__module__
        if _is_computing(mod):
            roots.add(mod)

    def follow(obj: Any) -> None:
        key = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
        if key in sources:
            return
        try:
            src = textwrap.dedent(inspect.getsource(obj))
        except (OSError, TypeError):
            raise _NoSource(key) from None
        sources[key] = src
        try:
            tree = _parse(src)
        except SyntaxError:  # a lambda cut out of a longer expression
            tree = _parse(f"({src.strip().rstrip(',')})") if src.lstrip().startswith("lambda") else None
            if tree is None:
                raise _NoSource(key) from None
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                roots.add(node.module)
                roots.update(f"{node.module}.{a.name}" for a in node.names)
        scope = getattr(obj, "__globals__", None)
        if scope is None:
            scope = vars(sys.modules[obj.__module__]) if obj.__module__ in sys.modules else {}
        imported = _import_map(scope.get("__name__", ""))
        for ident in sorted(_free_loads(tree)):
            if _is_computing(imported.get(ident)):
                roots.add(imported[ident])
            if ident in scope:
                refer(scope[ident])

    try:
        # The closure's own source, not that of the function that built it: a factory building several
        # bodies would otherwise give each the imports of all. What the factory hands the closure is
        # in its cells.
        follow(fn)
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                refer(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
    except _NoSource:
        return None
    known = module_files()
    return StageCode(tuple(sorted(sources.items())), frozenset(r for r in roots if r in known))


class _NoSource(Exception):
    pass


@functools.lru_cache(maxsize=256)
def _modules_digest(roots: frozenset[str]) -> str:
    return _digest_modules(reached_modules(roots, read_module), read_module)


def _digest_modules(modules: Iterable[str], read: Callable[[str], bytes | None]) -> str:
    h = hashlib.sha256()
    for m in sorted(modules):
        src = read(m)
        h.update(m.encode() + b"\0")
        h.update(hashlib.sha256(src if src is not None else b"<missing>").digest())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _tree_digest() -> str:
    h = hashlib.sha256()
    for pkg in COMPUTING_PACKAGES:
        root = Path(importlib.import_module(pkg).__file__).parent
        for f in sorted(root.rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def code_version(fn: Callable[..., Any] | None = None, *, read: Callable[[str], bytes | None] | None = None) -> str:
    """The installed version plus a digest of the code that computes a stage.

    With a stage body ``fn``: its own source (and that of the flow helpers it calls, see
    ``stage_code``) plus every module of the computing packages (storage, tasks,
    workers) it can reach, following every import statement of every reached module, top level
    and inside functions. An edit elsewhere (another stage's module, a comment in tasks/caf/method.py)
    leaves it unchanged, so the stage is reused. ``read`` replaces reading a module's source
    (name -> bytes; tests).

    Without ``fn``, or when ``fn``'s source cannot be found (a builtin, code made at run time),
    the digest of the whole computing tree: conservative, any change recomputes.

    The version alone would let an edited stage (editable installs, a hot-fixed image) reuse
    outputs of the old code; the digest makes a change to a stage's computation recompute it.
    """
    code = stage_code(fn) if fn is not None else None
    if code is None:
        if read is None:
            return f"{_version()}+{_tree_digest()[:12]}"
        return f"{_version()}+{_digest_modules(module_files(), read)[:12]}"
    h = hashlib.sha256()
    for key, src in code.sources:
        h.update(key.encode() + b"\0" + src.encode() + b"\0")
    h.update(_modules_digest(code.roots).encode() if read is None
             else _digest_modules(reached_modules(code.roots, read), read).encode())
    return f"{_version()}+{h.hexdigest()[:12]}"


def _clear_code_caches() -> None:
    for f in (_module_files, module_imports, _import_map, _modules_digest, _tree_digest):
        f.cache_clear()


code_version.cache_clear = _clear_code_caches  # type: ignore[attr-defined]

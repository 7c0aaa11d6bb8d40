"""Layers import downward only (docs/contributing.md, "Layers"): every import in the project's code, at module
level or inside a function, goes to the same layer or a lower one. tests/, bench/ and devtools/ are exempt.

    base              aiwriter's infrastructure: settings, errors, redis, redis_guard, observability, ...
    catalog           every app's `models`: providers, models, agents, prices and the rows that point at them
    llm               the AI service layer, agents.llm.*
    catalog services  agents.selectors and agents.services: catalog reads and writes that also read the AI
                      layer's live health and clear its caches
    billing           usage.*: metering, holds, records, prices for billing, key limits
    entry             conversations, openai_compat, writer; every app's views, urls, admin, serializers,
                      consumers, apps and management commands; usage.debug; aiwriter's wiring (urls, asgi, ...)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXEMPT = {"tests", "bench", "devtools", ".venv", "var", "staticfiles", "node_modules"}

BASE, CATALOG, LLM, CATALOG_SERVICES, BILLING, ENTRY = range(6)
NAMES = ["base", "catalog", "llm", "catalog services", "billing", "entry"]

ENTRY_APPS = {"conversations", "openai_compat", "writer"}
# Modules that only answer requests, run commands or wire the project: nothing below imports them.
ENTRY_MODULES = {"views", "urls", "admin", "serializers", "consumers", "apps"}
AIWRITER_WIRING = {"asgi", "routing", "urls", "middleware", "pages", "dashboard", "charts", "health", "openapi", "apps",
                   "ws_auth"}
EXPLICIT = {
    "agents.selectors": CATALOG_SERVICES,
    "agents.services": CATALOG_SERVICES,
    "usage.debug": ENTRY,  # staff debug runs: an entry point like /v1
}


def layer(module: str) -> int | None:
    """The layer of a dotted module name, or None if no rule places it (a new module needs one here)."""
    parts = module.split(".")
    app, last = parts[0], parts[-1]
    if module in EXPLICIT:
        return EXPLICIT[module]
    if len(parts) == 1 or module.endswith(".__init__"):
        return BASE  # package markers (empty): `from usage import pricing` is an import of usage.pricing
    if app == "aiwriter":
        return ENTRY if parts[1] in AIWRITER_WIRING else BASE
    if last == "models":
        return CATALOG  # data that foreign keys tie together; models import no services
    if last in ENTRY_MODULES or "management" in parts or app in ENTRY_APPS:
        return ENTRY
    if app == "agents" and parts[1] == "llm":
        return LLM
    if app == "usage":
        return BILLING
    return None


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    modules = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in EXEMPT or len(rel.parts) == 1 or "migrations" in rel.parts:
            continue
        if not (root / rel.parts[0] / "__init__.py").exists():
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement in the file, wherever it is."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            # `from usage import pricing` imports the module usage.pricing; `from usage.models import X` usage.models
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]  # `import agents.llm.types` -> agents.llm.types; externals -> ""
            if name:
                found.append((name, node.lineno))
    return found


def upward_imports(root: Path = ROOT) -> tuple[list[str], list[str]]:
    modules = project_modules(root)
    unplaced = sorted(m for m in modules if layer(m) is None)
    upward = []
    for module, path in sorted(modules.items()):
        own = layer(module)
        if own is None:
            continue
        for target, line in imports(module, path, modules):
            theirs = layer(target)
            if theirs is not None and theirs > own:
                upward.append(f"{path.relative_to(root)}:{line}: {module} ({NAMES[own]}) imports "
                              f"{target} ({NAMES[theirs]})")
    return upward, unplaced


def test_every_import_goes_to_the_same_layer_or_below():
    upward, unplaced = upward_imports()
    assert not unplaced, "modules with no layer (add a rule in tests/test_layers.py): " + ", ".join(unplaced)
    assert not upward, "imports that go upward:\n" + "\n".join(upward)


def test_the_mapping_places_the_layers_where_the_docs_say():
    assert [layer(m) for m in ("aiwriter.redis_guard", "aiwriter.observability", "agents.models", "usage.models",
                               "agents.llm.service", "agents.selectors", "usage.metering", "usage.keylimits",
                               "usage.pricing", "openai_compat.calls", "writer.services", "conversations.generation",
                               "agents.views", "usage.admin", "agents.management.commands.seed_demo",
                               "aiwriter.urls")] == [
        BASE, BASE, CATALOG, CATALOG, LLM, CATALOG_SERVICES, BILLING, BILLING, BILLING, ENTRY, ENTRY, ENTRY,
        ENTRY, ENTRY, ENTRY, ENTRY]


@pytest.mark.parametrize(("module", "source", "expected"), [
    ("agents/llm/probe.py", "from usage import metering\n", "agents.llm.probe (llm) imports usage.metering (billing)"),
    ("usage/probe.py", "def f():\n    from openai_compat import calls\n",
     "usage.probe (billing) imports openai_compat.calls (entry)"),
    ("aiwriter/probe.py", "from agents.models import Agent\n", "aiwriter.probe (base) imports agents.models (catalog)"),
    ("agents/models.py", "from . import services\n", "agents.models (catalog) imports agents.services"),
])
def test_an_upward_import_fails(tmp_path, module, source, expected):
    """The check itself: a copy of the project's packages with one upward import added is caught, with its line."""
    for package in ("aiwriter", "agents", "usage", "conversations", "openai_compat", "writer"):
        for path in (ROOT / package).rglob("*.py"):
            target = tmp_path / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text())
    (tmp_path / module).write_text((tmp_path / module).read_text() + source if (tmp_path / module).exists()
                                   else source)
    upward, unplaced = upward_imports(tmp_path)
    assert not unplaced
    assert len(upward) == 1 and expected in upward[0], upward

"""Every entry point runs its model calls through the one pipeline (usage/pipeline.py): outside billing's own
modules, nothing calls metering or key limits' acquire directly, and chat, /v1, the writer and staff debug runs
each use the pipeline."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = ["conversations/generation.py", "openai_compat/calls.py", "openai_compat/views.py",
                "writer/services.py", "usage/debug.py"]
# Where metering and admission live: the pipeline and the modules it is made of.
OWNERS = {"usage/pipeline.py", "usage/metering.py", "usage/keylimits.py", "usage/hotpath.py"}
DIRECT = {"metered_stream", "metered_complete"}


def _names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names |= {alias.name for alias in node.names}
    return names


def _project_files():
    for app in ("agents", "aiwriter", "conversations", "openai_compat", "usage", "writer"):
        yield from (ROOT / app).rglob("*.py")


def test_nothing_but_the_pipeline_calls_metering_directly():
    offenders = [str(p.relative_to(ROOT)) for p in _project_files()
                 if str(p.relative_to(ROOT)) not in OWNERS and _names(p) & DIRECT]
    assert offenders == []


def test_every_entry_point_uses_the_pipeline():
    for relative in ENTRY_POINTS:
        assert "pipeline" in _names(ROOT / relative), relative

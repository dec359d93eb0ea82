"""Adding a figure is one entry in `ckaflow.figure_registry`: each family has its drawing
generator, its caption and its report category, and nothing else lists figures."""

import ast
import inspect

from ckaflow import figure_registry, plots
from tests.conftest import REPO


def test_each_family_has_a_drawing_a_caption_and_a_category():
    names = [family.name for family in figure_registry.FAMILIES]
    assert len(set(names)) == len(names)
    captions = {p.stem for p in (REPO / "workflow" / "report").glob("*.rst")} - {"summary"}
    assert set(names) == captions  # no family without a caption, no caption without a family
    for family in figure_registry.FAMILIES:
        draw = getattr(plots, family.draw)
        assert inspect.isgeneratorfunction(draw), family.draw
        assert family.category.strip(), family.name


def test_the_registry_is_read_where_snakemake_parses():
    """No matplotlib, torch or pandas: `Study` reads it while Snakemake parses the workflow."""
    tree = ast.parse(inspect.getsource(figure_registry))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            modules.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
    assert modules == {"__future__", "collections", "dataclasses", "typing"}, modules

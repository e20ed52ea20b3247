"""A pytest hook for the docstring examples under jattn/: those importing torch or equinox run
only where they are installed. (Not part of the installed package: the wheel leaves it out.)

Neither is a dependency of jattn (CI installs both), so the docstrings import them plainly, as a
reader would, and here an example is skipped from its ``import torch`` (or ``equinox``) line on
when that library is missing; the lines before it still run. A docstring left with nothing to run
is reported as skipped, naming what it needs.
"""

import ast
import doctest
import importlib.util

import pytest

OPTIONAL = ("equinox", "torch")


def _imported(source: str) -> set[str]:
  """The top-level packages that one doctest example imports."""
  try:
    tree = ast.parse(source)
  except SyntaxError:
    return set()
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name.partition(".")[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module.partition(".")[0])
  return names


def pytest_collection_modifyitems(config, items):
  missing = {name for name in OPTIONAL if importlib.util.find_spec(name) is None}
  if not missing:
    return
  for item in items:
    test = getattr(item, "dtest", None)  # a DoctestItem's doctest.DocTest
    if test is None:
      continue
    needs: list[str] = []
    for example in test.examples:
      needs = needs or sorted(_imported(example.source) & missing)
      if needs:
        example.options[doctest.SKIP] = True
    if needs and all(example.options.get(doctest.SKIP) for example in test.examples):
      item.add_marker(pytest.mark.skip(reason=f"the example needs {', '.join(needs)}"))

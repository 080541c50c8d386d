"""``sc_dpo_jax.parallel`` imports nothing from ``sc_dpo_jax.train`` (train builds on parallel, never the reverse).

Read from the source with ``ast`` (imports inside functions count too), so the check needs no JAX.
"""
import ast
import os

PACKAGE = "sc_dpo_jax"
FORBIDDEN = "sc_dpo_jax.train"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARALLEL = os.path.join(ROOT, PACKAGE, "parallel")


def imported_modules(source: str, module: str, is_package: bool = False):
  """Every module an ``import`` or ``from ... import`` in ``source`` names (absolute, relative ones resolved
  against ``module``), with its line; ``from a import b`` counts as both ``a`` and ``a.b``."""
  package = module if is_package else module.rpartition(".")[0]
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, node.lineno
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1])
        target = f"{base}.{node.module}" if node.module else base
      else:
        target = node.module
      yield target, node.lineno
      for alias in node.names:
        yield f"{target}.{alias.name}", node.lineno


def _is_forbidden(name: str) -> bool:
  return name == FORBIDDEN or name.startswith(FORBIDDEN + ".")


def test_the_checker_sees_every_form_of_import():
  bad = ["import sc_dpo_jax.train.state", "from sc_dpo_jax.train import dpo_steps", "from sc_dpo_jax import train",
         "from ..train import state", "from ..train.state import TrainState",
         "def f():\n  from sc_dpo_jax.train.state import TrainState"]
  for source in bad:
    assert any(_is_forbidden(n) for n, _ in imported_modules(source, "sc_dpo_jax.parallel.sharding")), source
  good = ["import sc_dpo_jax.data.device", "from sc_dpo_jax import data", "from . import rules",
          "from .step import Step", "from sc_dpo_jax.parallel import training_free"]
  for source in good:
    assert not any(_is_forbidden(n) for n, _ in imported_modules(source, "sc_dpo_jax.parallel.sharding")), source
  assert not any(_is_forbidden(n) for n, _ in imported_modules("from . import step", "sc_dpo_jax.parallel", True))


def test_parallel_imports_nothing_from_train():
  files = []
  offending = []
  for folder, _, names in os.walk(PARALLEL):
    for name in sorted(names):
      if not name.endswith(".py"):
        continue
      path = os.path.join(folder, name)
      files.append(path)
      rel = os.path.relpath(path, ROOT)
      module = rel[:-3].replace(os.sep, ".")
      is_package = name == "__init__.py"
      if is_package:
        module = module.rpartition(".")[0]
      with open(path, encoding="utf-8") as f:
        source = f.read()
      offending += [f"{rel}:{line}: {imported}" for imported, line in imported_modules(source, module, is_package)
                    if _is_forbidden(imported)]
  assert len(files) >= 5, files   # the package was found
  assert not offending, "sc_dpo_jax/parallel must not import sc_dpo_jax.train:\n" + "\n".join(offending)

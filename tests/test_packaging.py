"""What a ``pip install`` gets: the wheel carries the run configs and the toy world's weights, and its
requirements pick TensorFlow's wheel by platform (macOS has no ``tensorflow-cpu``). A user outside a checkout
finds the configs with ``python -m sc_dpo_jax.configs``, and the checkout's ``configs/*.py`` are the same
configs."""
import importlib
import importlib.util
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  out = tmp_path_factory.mktemp("wheel")
  result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), ROOT], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  (path,) = [p for p in out.iterdir() if p.suffix == ".whl"]
  return path


def test_wheel_carries_configs_and_toy_weights_and_platform_markers(wheel):
  from sc_dpo_jax import configs
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
  for name in configs.NAMES:
    assert f"sc_dpo_jax/configs/{name}.py" in names, name
  assert "sc_dpo_jax/configs/__main__.py" in names
  assert any(n.startswith("sc_dpo_jax/toy/assets/base/pipeline/unet/") for n in names)
  requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: tensorflow")]
  assert any("tensorflow-cpu" in r and 'sys_platform != "darwin"' in r for r in requires), requires
  assert any(r.startswith("Requires-Dist: tensorflow<") or r.startswith("Requires-Dist: tensorflow>")
             for r in requires if 'sys_platform == "darwin"' in r), requires


def test_installed_configs_are_found_outside_a_checkout(wheel, tmp_path):
  target = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                 check=True, capture_output=True, timeout=300)
  env = dict(os.environ, PYTHONPATH=str(target))
  result = subprocess.run([sys.executable, "-m", "sc_dpo_jax.configs"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  folder = result.stdout.strip()
  assert folder.startswith(str(target)) and os.path.isfile(os.path.join(folder, "duo.py"))


@pytest.mark.parametrize("name,variant", [("duo", "tiny"), ("toy", "quick"), ("cost_model", "tiny"),
                                          ("shielddiff_rl", "tiny"), ("unet_interop", None)])
def test_checkout_configs_are_the_shipped_ones(name, variant):
  spec = importlib.util.spec_from_file_location(f"checkout_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  shipped = importlib.import_module(f"sc_dpo_jax.configs.{name}")
  assert module.__doc__ == shipped.__doc__
  args = () if variant is None else (variant,)
  assert module.get_config(*args).to_json_best_effort() == shipped.get_config(*args).to_json_best_effort()



"""The GPU measurement tools in mom_bench.bench.tools import on the CPU (imports between them are package
imports) and each has a `main` for `python -m`; importing one runs no benchmark."""
import importlib
import pkgutil

import pytest

pytest.importorskip("triton")

from mom_bench.bench import tools  # noqa: E402

TOOLS = ["ab_layer", "conv_tiles", "core_configs", "cpu_profile", "decode_ab", "lm_eval_generation",
         "profile_layers"]


def test_the_package_holds_exactly_these_tools():
    assert sorted(m.name for m in pkgutil.iter_modules(tools.__path__)) == TOOLS


@pytest.mark.parametrize("name", TOOLS)
def test_each_tool_imports_and_has_a_main(name):
    module = importlib.import_module(f"mom_bench.bench.tools.{name}")
    assert callable(module.main)
    assert f"`{name}" in tools.__doc__  # listed in the package's docstring
    assert f"python -m mom_bench.bench.tools.{name}" in module.__doc__  # its usage line

"""The README's generated sections match their sources (the registry, the committed benchmark results)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "benchmarks" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_generated_sections_are_current():
    assert _update_readme().main(["--check"]) == 0, "run: python benchmarks/update_readme.py"


def test_readme_names_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert "bash dev.sh demo" in readme and "bash dev.sh test" in readme
    assert "bash dev.sh test" in (ROOT / ".ci" / "run").read_text().replace("dev.sh test -p", "dev.sh test")

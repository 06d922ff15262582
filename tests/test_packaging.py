"""Packaging: sub-packages listed in pyproject, and the top-level `kernels` folder never shadows Hugging Face's
`kernels` package when the repository root is on sys.path."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, mapping = set(config["packages"]), config["package-dir"]
    found = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_repo_root_on_sys_path_does_not_shadow_hf_kernels():
    # `python -c` puts the working directory first on sys.path, as a user in a checkout would have it.
    code = (
        "import transformers.integrations.moe, transformers.utils.import_utils as u, sys;"
        "import hf_hetermoe.kernels as k;"
        "m = sys.modules.get('kernels');"
        "print(u.is_kernels_available(), getattr(m, '__file__', None) != k.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    available, distinct = out.stdout.split()[-2:]
    assert distinct == "True"
    try:
        import importlib.metadata

        importlib.metadata.version("kernels")
        assert available == "True"  # the real package wins
    except importlib.metadata.PackageNotFoundError:
        assert available == "False"  # our folder looks absent


def test_cli_lists_subcommands_and_env_runs(monkeypatch, tmp_path):
    import json

    from hf_hetermoe.kernels import tuning

    monkeypatch.setenv("HETERMOE_SPLIT_TAIL", "0")
    monkeypatch.setenv("HETERMOE_CACHE_DIR", str(tmp_path))
    current = f"v{tuning.VERSION}|gemm|GPU|key"
    (tmp_path / "tuning.json").write_text(json.dumps({current: {}, "v1|gemm|GPU|key": {}}))
    from hf_hetermoe.cli import main
    from hf_hetermoe.commands.env import env_info

    info = env_info()
    assert info["hf-hetermoe"] and "mixtral" in info["supported model types"]
    assert "fused_cross_entropy=True" in info["prepare defaults"] and "fused_rms_norm=True" in info["prepare defaults"]
    assert "tuning.json" in info["tuning cache"] and "HETERMOE_SPLIT_TAIL=0" in info["HETERMOE_* set"]
    assert "(1 tuned choices, 1 of older kernel versions ignored" in info["tuning cache"]
    assert main(["env"]) == 0
    out = subprocess.run([sys.executable, "-m", "hf_hetermoe.cli", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0 and "demo" in out.stdout and "plan" in out.stdout


def test_cli_check_reports_each_family(tmp_path, capsys, monkeypatch):
    """``hetermoe check``: prepared against unprepared tiny models, by model type or family name, a JSON report
    written whole, exit status 1 when a family fails, and a clear error for an unknown name."""
    import json

    import pytest

    from hf_hetermoe.cli import main
    from hf_hetermoe.model_patches import verify

    report_path = tmp_path / "out" / "check.json"
    assert main(["check", "mixtral", "OLMoE", "--device", "cpu", "--json", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "PASS  Mixtral" in out and "PASS  OLMoE" in out and "2 passed, 0 failed" in out
    data = json.loads(report_path.read_text())
    assert data["dtype"] == "float32" and set(data["families"]) == {"Mixtral", "OLMoE"}
    assert all(r["passed"] for r in data["families"].values())

    real = verify.verify_family

    def broken(patch, **kw):
        report = real(patch, **kw)
        report.grad_delta = 1.0
        return report

    monkeypatch.setattr(verify, "verify_family", broken)
    assert main(["check", "mixtral", "--device", "cpu"]) == 1
    assert "FAIL  Mixtral: gradients differ by 1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no family 'nosuch'.*mixtral"):
        main(["check", "nosuch"])


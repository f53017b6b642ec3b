"""What a newcomer relies on: the README's two commands, one-line errors for missing extras, and a
test suite that fails (never skips) when a prerequisite is missing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def first_code_block(section: str) -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"\n## {section}\n")
    match = re.search(r"```bash\n(.*?)```", readme[start:], re.S)
    assert match is not None, f"no code block under ## {section}"
    return match.group(1)


def commands(block: str) -> list[str]:
    """The block's command lines, comments stripped."""
    lines = (line.split("  #")[0].strip() for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_the_test_section_is_one_command_and_ci_runs_exactly_it() -> None:
    (command,) = commands(first_code_block("Test"))
    assert command == "bash tests/run.sh"
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    ci_commands = [line for line in ci if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_commands == [f"exec {command}"]


def test_install_section_runs_the_main_job_on_the_embedded_model() -> None:
    block = commands(first_code_block("Install and run"))
    assert any(line.startswith("pip install") for line in block)
    (run,) = [line for line in block if line.startswith("moeserve ")]
    assert run.startswith("moeserve generate ") and "--model" not in run


def run_without(module: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter where importing `module` fails as if it were not installed."""
    prelude = f"import sys; sys.modules[{module!r}] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_serve_ray_without_ray_prints_one_line_and_exits_2() -> None:
    result = run_without(
        "ray", "from moeserve.workers.cli.main import main; sys.exit(main(['serve', '--ray']))"
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'ray'" in lines[0] and 'pip install "moeserve[ray]"' in lines[0]
    assert "Traceback" not in result.stderr


def test_operator_without_kopf_prints_one_line_and_exits_2() -> None:
    result = run_without("kopf", "from moeserve.operator.entry import main; sys.exit(main([]))")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "moeserve-operator: error: moeserve-operator needs the Python package 'kopf', which is not "
        'installed: pip install "moeserve[operator]"'
    ]


def test_a_missing_test_dependency_fails_the_run_with_its_install_command() -> None:
    args = ["-q", "-p", "no:cacheprovider", "tests/unit/test_config.py"]
    code = f"import pytest; sys.exit(pytest.main({args!r}))"
    result = run_without("ray", code)
    output = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, output
    assert "ray  (extra: ray)" in output and "bash tests/run.sh" in output
    assert "passed" not in output and "skipped" not in output


def test_no_test_skips_except_the_gpu_tier() -> None:
    offenders = []
    for path in (ROOT / "tests").rglob("*.py"):
        if path.is_relative_to(ROOT / "tests" / "gpu") or path == Path(__file__).resolve():
            continue
        text = path.read_text()
        for word in ("importorskip", "pytest.skip(", "mark.skip"):
            if word in text:
                offenders.append(f"{path.relative_to(ROOT)}: {word}")
    assert offenders == []


def test_python_run_from_the_repository_root_gets_the_standard_library_operator() -> None:
    # -S: no site packages, so nothing imports `operator` before the current directory is on sys.path
    # (an editable install's finder does, which would hide the problem).
    code = "import enum, operator, sys; assert 'operator' in sys.modules; print(operator.__file__)"
    result = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).parent != ROOT / "operator"
    assert Path(result.stdout.strip()).name == "operator.py"


def test_every_python_package_of_the_tree_is_installed() -> None:
    """A non-editable install (the image) gets only the listed packages: a new subpackage missing
    from pyproject.toml imports in the checkout but not in the pods (the e2e tier found one)."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join((name, *init.parent.relative_to(ROOT / folder).parts))
        for name, folder in setup["package-dir"].items()
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert found - set(setup["packages"]) == set(), "add them to [tool.setuptools] packages"

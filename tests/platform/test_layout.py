"""The repository layout: `platform/` must not shadow the standard library, and the import direction holds."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_platform_folder_has_no_init():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_stdlib_platform_wins_with_repo_root_first_on_sys_path():
    """Under `python -m` and Ray's working_dir the repo root is first on sys.path."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import platform; assert hasattr(platform, 'machine'), platform.__file__;"
        "import sysconfig; assert platform.__file__.startswith(sysconfig.get_paths()['stdlib']), platform.__file__;"
        "import looplm.platform.cli, looplm.platform.demo;"
        "import ray, torch;"  # both import the standard library's platform
        "print(platform.machine())"
    )
    result = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def _looplm_imports(path: Path) -> set[str]:
    """The looplm subpackages a module imports, absolute or relative."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found |= {name.split(".")[1] for name in names if name.startswith("looplm.") and name.count(".") >= 1}
    return found


ALLOWED = {
    "model": set(),
    "infra": {"model"},
    "serving": {"model", "infra"},
    "pipelines": {"model", "infra", "serving"},
    "platform": {"model", "infra", "serving", "pipelines"},
}


def test_import_direction():
    for package, allowed in ALLOWED.items():
        for path in (REPO / package).rglob("*.py"):
            imported = _looplm_imports(path) - {package}
            assert imported <= allowed, f"{path.relative_to(REPO)} imports looplm.{imported - allowed}"


def test_cli_help_lists_the_commands():
    result = subprocess.run(
        [sys.executable, "-m", "looplm.platform.cli", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    for command in ("demo", "curate", "train", "eval", "mlflow"):
        assert command in result.stdout

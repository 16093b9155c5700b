"""What a user installs: the LICENSE, the sdist (builds the wheel and runs the tests), the wheel (compiled
kernels, package data; works installed in a fresh venv), the extras (aiobotocore only with [sqs]) and a
failed kernel compile that is loud, or fatal when CANPIPE_REQUIRE_COMPILED=1."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
SQS_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/telemetry"
# what the tests and the build read besides engine/: the sdist must hold every file of these
SOURCE_DIRS = ["ext", "tests", "bench", "loadtest", "docs", "deploy"]
NEVER_SHIPPED = (".c", ".so", ".html", ".pyc")


def has_distribution(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without canpipe's settings or coverage's subprocess hooks (a fresh user's shell)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CANPIPE_", "COV_", "COVERAGE_"))}
    return {**env, **extra}


def source_files() -> set[str]:
    """Files the sdist must hold: the top-level ones and every file under SOURCE_DIRS, caches aside."""
    wanted = {"LICENSE", "README.md", "setup.py", "pyproject.toml", "MANIFEST.in"}
    wanted |= {"Dockerfile", ".dockerignore", "compose.yaml"}  # deploying from a source release, as from a clone
    for top in SOURCE_DIRS:
        for path in (ROOT / top).rglob("*"):
            rel = path.relative_to(ROOT)
            if path.is_file() and "__pycache__" not in rel.parts and not path.name.endswith(NEVER_SHIPPED):
                if rel.parts[:2] != ("loadtest", "reports"):  # generated reports, not sources
                    wanted.add(rel.as_posix())
    for pattern in ("*.pyi", "py.typed", "can/data/*"):
        wanted |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "engine").rglob(pattern) if p.is_file()}
    return wanted


# --- LICENSE and extras ------------------------------------------------------------------------------------


def test_license_is_the_mit_text_pyproject_declares():
    text = (ROOT / "LICENSE").read_text()
    assert PYPROJECT["project"]["license"] == "MIT" and "LICENSE" in PYPROJECT["project"]["license-files"]
    assert text.startswith("MIT License\n") and "Copyright (c) 2026 canpipe contributors" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def test_the_default_install_leaves_sqs_to_its_extra_and_test_keeps_every_extra():
    project = PYPROJECT["project"]
    names = lambda reqs: {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip() for r in reqs}  # noqa: E731
    assert "aiobotocore" not in names(project["dependencies"])
    extras = project["optional-dependencies"]
    assert names(extras["sqs"]) == {"aiobotocore"} and {"duckdb", "pyarrow"} <= names(extras["lake"])
    assert {"cantools", "python-can"} <= names(extras["can"]) and {"locust"} <= names(extras["load"])
    assert {"aiobotocore", "zstandard"} <= names(extras["s3"])
    assert "canpipe[sqs,s3,lake,can,load]" in extras["test"], "CI (pip install -e .[test]) must test every extra"


BLOCK_AIOBOTOCORE = "import sys; sys.modules['aiobotocore'] = None; "  # what an install without [sqs] looks like


def test_no_module_of_engine_needs_aiobotocore_to_import():
    # the lazy-import rule: an install without [sqs] loads every module (and so every command) but the SQS calls
    code = BLOCK_AIOBOTOCORE + (
        "import importlib, pkgutil, engine\n"
        "names = [m.name for m in pkgutil.walk_packages(engine.__path__, 'engine.') if m.name != 'engine.__main__']\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(names))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) > 30


@pytest.mark.parametrize("command", [["consume"], ["serve", "--insecure-no-auth", "--port", "0"], ["check"]])
def test_an_sqs_url_without_aiobotocore_says_how_to_install_it(tmp_path, command):
    code = BLOCK_AIOBOTOCORE + "from engine.cli import main; sys.exit(main())"
    args = [sys.executable, "-c", code, *command, "--queue-url", SQS_URL, "--data-dir", str(tmp_path)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT, env=clean_env())
    assert done.returncode != 0
    assert "pip install 'canpipe[sqs]'" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [["consume"], ["check", "--consumer-only"]])
def test_an_s3_storage_url_without_aiobotocore_says_how_to_install_it(tmp_path, command):
    code = BLOCK_AIOBOTOCORE + "from engine.cli import main; sys.exit(main())"
    args = [sys.executable, "-c", code, *command, "--data-dir", str(tmp_path)]
    env = clean_env() | {"CANPIPE_STORAGE_URL": "s3://telemetry/fleet"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert done.returncode != 0
    assert "pip install 'canpipe[s3]'" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


# --- setup.py: a failed kernel compile ---------------------------------------------------------------------


@pytest.fixture
def build_tree(tmp_path):
    """setup.py, pyproject.toml and ext/ in a scratch folder (the build writes there, not in the checkout)."""
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "ext", tmp_path / "ext", ignore=shutil.ignore_patterns("*.html"))
    (tmp_path / "engine" / "kernels").mkdir(parents=True)
    return tmp_path


def build_ext_with_a_broken_compiler(tree: Path, **env: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", "lib", "--build-temp", "tmp"]
    return subprocess.run(
        args, cwd=tree, capture_output=True, text=True, timeout=100, env=clean_env(CC="/bin/false", **env)
    )


def test_a_failed_kernel_compile_names_every_kernel_not_built(build_tree):
    done = build_ext_with_a_broken_compiler(build_tree)
    assert done.returncode == 0, done.stderr  # the pure-Python twins serve
    assert "WARNING: these compiled kernels were NOT built" in done.stderr
    for pyx in (ROOT / "ext").glob("*.pyx"):
        assert f"engine.kernels._{pyx.stem}_c: " in done.stderr
    assert "canpipe check" in done.stderr and "CANPIPE_REQUIRE_COMPILED=1" in done.stderr
    assert not list((build_tree / "lib").rglob("*.so"))


def test_require_compiled_makes_a_failed_kernel_compile_fail_the_build(build_tree):
    done = build_ext_with_a_broken_compiler(build_tree, CANPIPE_REQUIRE_COMPILED="1")
    assert done.returncode != 0
    assert "CANPIPE_REQUIRE_COMPILED=1: kernel engine.kernels._" in done.stderr and "did not compile" in done.stderr


# --- the sdist and the wheel built from it -----------------------------------------------------------------


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    if has_distribution("build"):  # the PyPA tool, not a stray build/ folder
        args = [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out)]
    else:  # `build` is not a test dependency; setuptools' own command makes the same tarball
        args = [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(out)]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=100, env=clean_env())
    assert done.returncode == 0, done.stderr
    (tarball,) = out.glob("canpipe-*.tar.gz")
    return tarball


def test_the_sdist_holds_the_sources_the_build_and_the_tests_need(sdist):
    assert sdist.name == f"canpipe-{VERSION}.tar.gz"
    with tarfile.open(sdist) as tar:
        members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = source_files() - members
    assert not missing, f"not in the sdist: {sorted(missing)}"
    assert {"ext/jsonl.pyx", "tests/conftest.py", "bench/duckdb_hour.py", "loadtest/locustfile.py"} <= members
    assert {"engine/py.typed", "engine/can/data/canpipe_bms.dbc", "docs/grafana/canpipe.json"} <= members
    assert not [m for m in members if m.endswith(NEVER_SHIPPED) or "__pycache__" in m or "/reports/" in m]


def fresh_venv(where: Path, wheel: Path) -> Path:
    """A new venv holding only the wheel; the dependencies come from this venv's site-packages by a .pth
    (appended after the venv's own site-packages, and its .pth files, such as an editable canpipe's, not
    processed), so the test runs offline and the installed engine is the one imported."""
    venv.EnvBuilder(with_pip=False).create(where)
    python = where / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=120, env=clean_env())
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    Path(purelib, "canpipe-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return where


@pytest.mark.slow
@pytest.mark.timeout(600)  # the kernels compile with -O3: about a minute here, more on a loaded machine
def test_the_wheel_built_from_the_sdist_installs_and_runs(sdist, tmp_path):
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    source = tmp_path / sdist.name.removesuffix(".tar.gz")
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    done = subprocess.run(
        build, cwd=source, capture_output=True, text=True, timeout=500, env=clean_env(CANPIPE_REQUIRE_COMPILED="1")
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = wheels.glob(f"canpipe-{VERSION}-*.whl")

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"canpipe-{VERSION}.dist-info/METADATA").decode()
    for pyx in (ROOT / "ext").glob("*.pyx"):
        assert [n for n in names if n.startswith(f"engine/kernels/_{pyx.stem}_c.") and n.endswith(".so")], pyx.name
        assert f"engine/kernels/_{pyx.stem}_c.pyi" in names
    assert {"engine/py.typed", "engine/can/data/canpipe_bms.dbc"} <= names
    assert f"canpipe-{VERSION}.dist-info/licenses/LICENSE" in names
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: aiobotocore")]
    assert requires and all('extra == "sqs"' in line or 'extra == "s3"' in line for line in requires), requires

    env = fresh_venv(tmp_path / "venv", wheel)
    shutil.rmtree(source / "engine")  # the tests below must import the installed package, not the sources
    data = tmp_path / "data"

    def canpipe(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [env / "bin" / "canpipe", *args], cwd=tmp_path, capture_output=True, text=True, timeout=120,
            env=clean_env(**extra),
        )  # fmt: skip

    assert canpipe("--version").stdout.strip() == f"canpipe {VERSION}"
    located = subprocess.run(
        [env / "bin" / "python", "-c", "import engine; print(engine.__file__)"], cwd=tmp_path, capture_output=True,
        text=True, timeout=60, env=clean_env(),
    )  # fmt: skip
    assert located.stdout.startswith(str(env)), located.stdout + located.stderr

    ran = canpipe("run", "--data-dir", str(data), "--vehicles", "3", "--duration", "2", "--consumers", "1")
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert "missing 0" in ran.stdout and "accepted 30" in ran.stdout, ran.stdout

    checked = canpipe("check", "--data-dir", str(data), CANPIPE_API_KEYS="ops:s3cret", CANPIPE_REQUIRE_COMPILED="1")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (kernels,) = [line for line in checked.stdout.splitlines() if line.startswith("kernels: ")]
    reported = dict(item.split() for item in kernels.removeprefix("kernels: ").split(", "))
    assert set(reported) == {"candecode", "histogram", "groupby", "jsonl"}, kernels
    assert set(reported.values()) == {"compiled"}, kernels

    selection = subprocess.run(
        [env / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py",
         "--basetemp", tmp_path / "kernels",
         "-k", "every_compiled_kernel_is_built_and_selected or no_extensions_selects_every_twin"],
        cwd=source, capture_output=True, text=True, timeout=300, env=clean_env(),
    )  # fmt: skip
    assert selection.returncode == 0 and "2 passed" in selection.stdout, selection.stdout[-3000:]
    # the storage layout and the aggregator (every kernel on real files) against the installed package
    installed = subprocess.run(
        [env / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_storage.py",
         "tests/test_aggregator.py", "--basetemp", tmp_path / "installed"],
        cwd=source, capture_output=True, text=True, timeout=300, env=clean_env(),
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout[-3000:]

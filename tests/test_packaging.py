"""Packaging, checked fast: pyproject.toml's metadata, the one version, the sdist's contents
(built by the backend itself, a few seconds), the build settings that keep repeated and
isolated installs working, the fallbacks that make lookahead_fused._C optional, and what the
package does without _C (a subprocess in which importing _C fails).

The installs themselves (sdist into a fresh venv, `pip install .` twice, no compiler, no
CMake) take minutes each and need a package index: README "Building" lists them."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import lookahead_fused

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    pytest.skip("reads pyproject.toml with tomllib (Python 3.11+)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
SKBUILD = PYPROJECT["tool"]["scikit-build"]


def _overrides(condition: str) -> list[dict]:
    return [o for o in SKBUILD.get("overrides", []) if condition in o["if"]]


# --- metadata ------------------------------------------------------------------------------


def test_metadata_has_the_pep621_fields() -> None:
    assert PROJECT["name"] == "lookahead_fused"
    assert PROJECT["description"] and PROJECT["requires-python"].startswith(">=")
    assert PROJECT["readme"] == "README.md" and (ROOT / "README.md").is_file()
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    classifiers = PROJECT["classifiers"]
    assert len(classifiers) >= 5 and all(" :: " in c for c in classifiers)
    assert not any(c.startswith("License ::") for c in classifiers)  # PEP 639: the expression alone
    assert PROJECT["urls"] and all(u.startswith("https://") for u in PROJECT["urls"].values())
    assert {"test", "dev"} <= set(PROJECT["optional-dependencies"])
    assert any(re.match(r"torch\b", d) for d in PROJECT["dependencies"])
    assert (ROOT / "lookahead_fused" / "py.typed").is_file()


def _extra(name: str) -> list[str]:
    """The requirements of an extra, the extras it names of this project expanded."""
    out = []
    for requirement in PROJECT["optional-dependencies"][name]:
        requirement = re.sub(r"\s", "", requirement)
        own = re.fullmatch(r"lookahead_fused\[(.+)\]", requirement)
        out += [r for extra in own.group(1).split(",") for r in _extra(extra)] if own else [requirement]
    return out


def test_dev_extra_covers_requirements_dev() -> None:
    """test.sh installs requirements-dev.txt and the [test] extra; [dev] must not drift from them."""
    lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    wanted = [re.sub(r"\s", "", line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    dev = _extra("dev")
    missing = [w for w in wanted + _extra("test") if w not in dev]
    assert not missing, f"not in the [dev] extra: {missing}"


def test_version_is_written_once() -> None:
    assert PROJECT["dynamic"] == ["version"] and "version" not in PROJECT
    provider = SKBUILD["metadata"]["version"]
    assert provider["provider"] == "scikit_build_core.metadata.regex"
    source = ROOT / provider["input"]
    assert source == ROOT / "lookahead_fused" / "__init__.py"
    # scikit-build-core's default regex for a version
    found = re.findall(r"""(?im)^(?:__version__|VERSION)(?: ?: ?str)? *= *(['"])v?(.+?)\1""", source.read_text())
    assert [v for _, v in found] == [lookahead_fused.__version__]
    assert not (ROOT / "setup.py").exists() and not (ROOT / "setup.cfg").exists()
    for path in (ROOT / "lookahead_fused").rglob("*.py"):
        if path != source:
            assert "__version__ =" not in path.read_text(), path


def test_installed_metadata_matches_the_package() -> None:
    try:
        installed = importlib.metadata.version("lookahead_fused")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("lookahead_fused is imported from the tree, not installed")
    assert installed == lookahead_fused.__version__


# The one optional target built against torch (csrc/tensor_keys.cpp): its CMake block, from
# its option to the message that says it was left out.
TENSOR_KEYS_BLOCK = re.compile(r"set\(LOOKAHEAD_FUSED_TENSOR_KEYS .*?no _tensor_keys[^\n]*\n", re.S)


def test_torch_is_not_a_build_requirement() -> None:
    """Build isolation would download a multi-GB CUDA torch; the CMake build needs none. Only
    _tensor_keys uses torch, inside one block that builds it when the building Python imports
    torch (test_a_build_without_torch_leaves_out_tensor_keys_only)."""
    requires = PYPROJECT["build-system"]["requires"]
    assert not [r for r in requires if re.match(r"torch\b", r)]
    for path in (ROOT / "CMakeLists.txt", *(ROOT / "cmake").glob("*.cmake")):
        code = re.sub(r"#[^\n]*", "", path.read_text())  # comments may name torch
        if path.name == "CMakeLists.txt":
            code, found = TENSOR_KEYS_BLOCK.subn("", code)
            assert found == 1, "the _tensor_keys block of CMakeLists.txt moved: update TENSOR_KEYS_BLOCK"
        # TORCH_CUDA_ARCH_LIST is an environment variable in torch's syntax, read by CMake itself
        assert not re.search(r"torch", code.replace("TORCH_CUDA_ARCH_LIST", ""), re.I), path
    includes = [
        line
        for path in (ROOT / "csrc").rglob("*")
        if path.suffix in (".cpp", ".h", ".cu") and path.name != "tensor_keys.cpp"
        for line in path.read_text().splitlines()
        if re.match(r"\s*#\s*include\s*[<\"](torch|ATen|c10)/", line)
    ]
    assert not includes, includes


def test_a_build_without_torch_leaves_out_tensor_keys_only(tmp_path: Path) -> None:
    """Configured by a Python that cannot import torch (an isolated build), CMake builds _C
    and leaves out _tensor_keys, saying why; with LOOKAHEAD_FUSED_TENSOR_KEYS=ON it stops."""
    pybind11 = pytest.importorskip("pybind11")
    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('no torch in this build environment')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    args = ["cmake", "-S", str(ROOT), f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DLOOKAHEAD_FUSED_CUDA=OFF"]  # fmt: skip
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    done = subprocess.run([*args, "-B", str(tmp_path / "auto")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lookahead_fused: no _tensor_keys (" in done.stdout and "cannot import torch" in done.stdout, done.stdout
    assert "_tensor_keys" not in (tmp_path / "auto" / ("build.ninja" if "Ninja" in args else "Makefile")).read_text()
    required = subprocess.run(
        [*args, "-B", str(tmp_path / "on"), "-DLOOKAHEAD_FUSED_TENSOR_KEYS=ON"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert required.returncode != 0 and "LOOKAHEAD_FUSED_TENSOR_KEYS=ON, but" in required.stderr


# --- build settings ------------------------------------------------------------------------


def test_each_wheel_build_gets_a_fresh_folder_and_editables_keep_theirs() -> None:
    """A fixed in-tree cache kept the ninja of a deleted build-isolation environment."""
    assert SKBUILD.get("build-dir", "") == ""  # scikit-build-core: a new temporary folder
    (editable,) = _overrides("state")
    assert editable["if"]["state"] == "editable" and "{wheel_tag}" in editable["build-dir"]


def test_options_are_given_on_every_configure() -> None:
    """A kept build folder must not keep an old LOOKAHEAD_FUSED_CPU_ARCH/CUDA cache value."""
    define = SKBUILD["cmake"]["define"]
    assert define["LOOKAHEAD_FUSED_CPU_ARCH"] == {"env": "LOOKAHEAD_FUSED_CPU_ARCH", "default": "dispatch"}
    assert define["LOOKAHEAD_FUSED_CUDA"] == {"env": "LOOKAHEAD_FUSED_CUDA", "default": "AUTO"}
    text = (ROOT / "CMakeLists.txt").read_text()
    assert 'set(LOOKAHEAD_FUSED_CPU_ARCH "dispatch" CACHE' in text  # the same default by hand


def test_a_failed_build_falls_back_to_pure_python_unless_required() -> None:
    (failed,) = _overrides("failed")
    assert failed["if"] == {"failed": True, "env": {"LOOKAHEAD_FUSED_REQUIRE_EXTENSION": False}}
    assert failed["wheel"] == {"cmake": False}
    run_sh = (ROOT / "run.sh").read_text()
    assert "LOOKAHEAD_FUSED_REQUIRE_EXTENSION=${LOOKAHEAD_FUSED_REQUIRE_EXTENSION:-1}" in run_sh


@pytest.mark.parametrize(
    ("gpu", "setting", "expected"),
    [(False, None, "OFF"), (True, None, ""), (False, "AUTO", ""), (False, "ON", "")],
    ids=["no-gpu", "gpu", "asked-auto", "asked-on"],
)
def test_run_sh_builds_cuda_kernels_only_where_torch_sees_a_gpu(
    tmp_path: Path, gpu: bool, setting: str | None, expected: str
) -> None:
    """run.sh's main job leaves the CUDA kernels out where torch sees no GPU (a fresh set-up
    then fits in 3 minutes on 2 cores), unless LOOKAHEAD_FUSED_CUDA says otherwise; test.sh
    calls setup_env directly and always builds them."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexit {0 if gpu else 1}\n")  # stands for `torch.cuda.is_available()`
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "LOOKAHEAD_FUSED_CUDA"}
    if setting is not None:
        env["LOOKAHEAD_FUSED_CUDA"] = setting
    done = subprocess.run(
        ["bash", "-c", f'source "{ROOT / "run.sh"}"; PY="{fake}"; main_cuda_setting'],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected
    assert "main_cuda_setting" not in (ROOT / "test.sh").read_text()


def _backend():
    pytest.importorskip("scikit_build_core")
    sys.path.insert(0, str(ROOT / PYPROJECT["build-system"]["backend-path"][0]))
    try:
        import lookahead_fused_backend as backend
    finally:
        sys.path.pop(0)
    assert PYPROJECT["build-system"]["build-backend"] == backend.__name__
    return backend


def test_backend_loads_where_a_hook_of_skbuild_all_is_missing(monkeypatch) -> None:
    """scikit-build-core 0.11.0 (the declared minimum) lists prepare_metadata_for_build_editable
    in scikit_build_core.build.__all__ without defining it: `import *` failed there, and so
    did every build. Checked against 0.11.0 itself by hand (`pip wheel . --no-build-isolation`
    in a venv with scikit-build-core==0.11.0); here with its __all__ reproduced."""
    from scikit_build_core import build as skbuild

    missing = "prepare_metadata_for_build_editable"
    monkeypatch.delattr(skbuild, missing, raising=False)
    monkeypatch.setattr(skbuild, "__all__", [*(n for n in skbuild.__all__ if n != missing), missing])
    monkeypatch.delitem(sys.modules, "lookahead_fused_backend", raising=False)
    backend = _backend()  # imported anew: the module is out of sys.modules
    assert missing not in backend.__all__ and not hasattr(backend, missing)
    assert {"build_wheel", "build_sdist", "build_editable", "get_requires_for_build_wheel"} <= set(backend.__all__)
    assert backend.build_sdist is skbuild.build_sdist  # scikit-build-core's own hooks, re-exported
    monkeypatch.delitem(sys.modules, "lookahead_fused_backend", raising=False)  # the next test imports it anew


@pytest.mark.parametrize("hook", ["build_wheel", "build_editable"])
def test_backend_builds_without_cmake_when_cmake_is_missing(monkeypatch, hook: str) -> None:
    from scikit_build_core import build as skbuild
    from scikit_build_core.errors import CMakeNotFoundError

    backend = _backend()
    calls = []

    def fake(wheel_directory, config_settings=None, metadata_directory=None):
        calls.append(config_settings)
        if len(calls) == 1:
            raise CMakeNotFoundError("Could not find CMake with version >=3.18")
        return "lookahead_fused-0-py3-none-any.whl"

    monkeypatch.setattr(skbuild, hook, fake)
    monkeypatch.delenv("LOOKAHEAD_FUSED_REQUIRE_EXTENSION", raising=False)
    assert getattr(backend, hook)("dist", {"x": "1"}) == "lookahead_fused-0-py3-none-any.whl"
    assert calls == [{"x": "1"}, {"x": "1", "wheel.cmake": "false"}]
    calls.clear()
    monkeypatch.setenv("LOOKAHEAD_FUSED_REQUIRE_EXTENSION", "1")
    with pytest.raises(CMakeNotFoundError):
        getattr(backend, hook)("dist", None)
    assert calls == [None]
    assert set(backend.__all__) >= {"build_sdist", "build_wheel", "build_editable", "get_requires_for_build_wheel"}


def _tree_with_junk(dest: Path) -> Path:
    """A copy of the tracked files, plus what a working tree also holds and an sdist must not:
    a .venv/ with a cmake package (an unanchored "cmake/" include would take it), a build
    folder, a built _C and bytecode."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    for junk in (".venv/lib/python3/site-packages/cmake/data/share/x.cmake", ".venv/lib/python3/site-packages/csrc/y.h",
                 "build/cp3-cp3-linux/CMakeFiles/cmake/z.txt", "lookahead_fused/_C.cpython-3-x86_64-linux-gnu.so",
                 "lookahead_fused/__pycache__/check.cpython-3.pyc", "dist/old.tar.gz"):  # fmt: skip
        (dest / junk).parent.mkdir(parents=True, exist_ok=True)
        (dest / junk).write_text("junk")
    return dest


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_sdist_holds_what_building_c_needs(tmp_path: Path) -> None:
    """`python -m build --sdist` as the backend runs it (no isolation: a few seconds)."""
    _backend()
    tree = _tree_with_junk(tmp_path / "tree")
    code = (
        "import sys; sys.path.insert(0, 'buildsupport'); import lookahead_fused_backend as b; "
        f"print(b.build_sdist({str(tmp_path)!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    name = done.stdout.split()[-1]
    with tarfile.open(tmp_path / name) as sdist:
        members = sdist.getnames()
        top = members[0].split("/")[0]
        files = {m.removeprefix(top + "/") for m in members}
        pkg_info = sdist.extractfile(f"{top}/PKG-INFO").read().decode()
    for needed in ("CMakeLists.txt", "LICENSE", "README.md", "pyproject.toml", "cmake/cuda_arches.cmake",
                   "buildsupport/lookahead_fused_backend.py", "lookahead_fused/py.typed",
                   "triton_kernels/lookahead.py"):  # fmt: skip
        assert needed in files, needed
    tracked_csrc = {p.relative_to(tree).as_posix() for p in (tree / "csrc").rglob("*") if p.is_file()}
    assert len(tracked_csrc) >= 8 and tracked_csrc <= files, tracked_csrc - files
    junk = [f for f in files if f.startswith((".venv/", "build/", "dist/")) or f.endswith(".so") or "__pycache__" in f]
    assert not junk, junk[:10]
    assert f"Version: {lookahead_fused.__version__}" in pkg_info and "License-Expression: MIT" in pkg_info


# --- CMake: a CUDA compiler not found once is looked for again -----------------------------


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if os.access(p, os.X_OK)), None)


@pytest.mark.skipif(shutil.which("cmake") is None or _nvcc() is None, reason="needs cmake and nvcc")
def test_cuda_found_in_a_folder_first_configured_without_it(tmp_path: Path) -> None:
    """check_language(CUDA) caches NOTFOUND; an editable build folder outlives that."""
    pybind11 = pytest.importorskip("pybind11")
    nvcc_dir = str(Path(_nvcc()).parent)
    path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if p and not os.access(Path(p) / "nvcc", os.X_OK)
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_PATH", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST")
    }
    args = ["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DCMAKE_CUDA_ARCHITECTURES=80"]  # fmt: skip
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]

    def configure(search_path: str) -> str:
        done = subprocess.run(args, env={**env, "PATH": search_path}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert "lookahead_fused: CPU kernels only" in configure(path)
    assert "lookahead_fused: CUDA kernels for" in configure(nvcc_dir + os.pathsep + path)


# --- without _C ----------------------------------------------------------------------------

# Started in every subprocess below (sitecustomize): importing lookahead_fused._C fails.
BLOCK_C = """
import importlib.abc, sys

class _NoExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "lookahead_fused._C":
            raise ImportError("blocked by tests/test_packaging.py")
        return None

sys.meta_path.insert(0, _NoExtension())
"""

STEPS = """
import warnings
warnings.simplefilter("always")  # a repeated warning would show
import torch
import lookahead_fused
from lookahead_fused import backends

def run(backend):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = lookahead_fused.LookaheadAdam(model.parameters(), lr=1e-2, k=2, alpha=0.5, backend=backend)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(16, 8)).square().mean().backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])

foreach, eager = run("foreach"), run("eager")
torch.testing.assert_close(foreach, eager)
print("stepped foreach and eager alike")
print("auto is", backends.resolve("auto", {torch.device("cpu")}))
try:
    run("cpu")
except RuntimeError as e:
    print("cpu refused:", e)
"""


def _without_c(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "sitecustomize.py").write_text(BLOCK_C)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )  # fmt: skip


def test_without_c_import_warns_once_and_optimizers_still_step(tmp_path: Path) -> None:
    done = _without_c(tmp_path, "-c", STEPS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr.count("lookahead_fused._C is not available") == 1, done.stderr
    warning = re.search(r"ExtensionMissingWarning: (.*)", done.stderr).group(1)
    assert "(ImportError: blocked by tests/test_packaging.py)" in warning
    assert "the cpu, cuda, cuda_emulated backends cannot run" in warning
    assert "eager, foreach and triton (where Triton is installed) still work" in warning
    assert "stepped foreach and eager alike" in done.stdout
    assert "auto is foreach" in done.stdout
    assert "cpu refused: backend 'cpu' cannot run on cpu: lookahead_fused._C is not built" in done.stdout


def test_without_c_info_says_it_once_with_what_remains(tmp_path: Path) -> None:
    import torch

    done = _without_c(tmp_path, "-m", "lookahead_fused", "info")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"lookahead_fused {lookahead_fused.__version__} (" in out and f"torch {torch.__version__}" in out
    assert "ExtensionMissingWarning" not in done.stderr  # said once: in the report, not at import
    assert out.count("lookahead_fused._C: MISSING (ImportError: blocked by tests/test_packaging.py)") == 1, out
    assert re.search(r"without it the cpu, cuda, cuda_emulated backends cannot run; usable here: .*eager, foreach", out)
    for name in ("cpu", "cuda_emulated"):
        assert re.search(rf"^  {name}\s+unavailable: lookahead_fused._C is not built", out, re.M), out
    for name in ("eager", "foreach"):
        assert re.search(rf"^  {name}\s+usable$", out, re.M), out


def test_with_c_nothing_is_said() -> None:
    pytest.importorskip("lookahead_fused._C")
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", "import lookahead_fused"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0 and "lookahead_fused._C" not in done.stderr, done.stderr

"""The CPU kernels compile for 64-bit ARM (aarch64), where only their portable path exists and the compiler
vectorizes it for NEON: a cross-compile of every csrc/cpu source with zig's clang (the `ziglang` package, a test
dependency), so that an x86-only construct fails here rather than on a user's ARM machine."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "csrc" / "cpu").glob("*.cpp")) + [ROOT / "csrc" / "ops.cpp"]


@pytest.fixture(scope="module")
def arm_flags(tmp_path_factory):
    pytest.importorskip("ziglang", reason="needs the ziglang package (pip install ziglang; a test extra)")
    # torch's headers include omp.h, which zig does not ship: gcc's (declarations only, the same on every target)
    gcc_include = subprocess.run(["gcc", "-print-file-name=include"], capture_output=True, text=True).stdout.strip()
    gcc_omp = Path(gcc_include) / "omp.h"
    assert gcc_omp.is_file(), f"gcc's omp.h not found in {gcc_include}"
    inc = tmp_path_factory.mktemp("omp")
    shutil.copy(gcc_omp, inc / "omp.h")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{inc}"]
    return ["-target", "aarch64-linux-gnu", "-std=c++20", "-O2", "-fopenmp", "-DTORCH_EXTENSION_NAME=_C", *includes]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles_for_aarch64(source, arm_flags, tmp_path):
    obj = tmp_path / f"{source.stem}.o"
    out = subprocess.run([sys.executable, "-m", "ziglang", "c++", *arm_flags, "-c", str(source), "-o", str(obj)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert obj.read_bytes()[:4] == b"\x7fELF" and obj.read_bytes()[18] == 183  # ELF e_machine 183: AArch64

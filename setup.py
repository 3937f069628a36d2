"""Builds the tinychat._C extension (metadata lives in pyproject.toml).

    CUDA_HOME=/usr/local/cuda-13.0 MAX_JOBS=2 pip install --no-build-isolation -e .

The build writes its progress to the terminal (pip hides a build's output unless it fails) and keeps its objects in
build/editable-temp, so that the next editable install recompiles only what changed.

Environment:
    TINYCHAT_CUDA          auto (default): build the CUDA kernels when torch has CUDA and a
                           toolkit is found; 1: require them; 0: CPU only.
    CUDA_HOME              the CUDA toolkit root (must contain include/cuda_runtime.h).
    TORCH_CUDA_ARCH_LIST   GPU architectures to compile for; default "8.0;9.0".
    MAX_JOBS               parallel compile jobs (ninja).
"""

import contextlib
import glob
import importlib.util
import json
import os
import re
import sys
import threading
import time

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def _cuda_toolkit_problem() -> str | None:
    """Why the CUDA kernels cannot be built here, or None when they can."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    home = cpp_extension.CUDA_HOME
    if not home:
        return "no CUDA toolkit found (nvcc is not on PATH and CUDA_HOME is not set)"
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return f"CUDA_HOME={home} is not a CUDA toolkit (it has no include/cuda_runtime.h)"
    if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return f"CUDA_HOME={home} has no bin/nvcc"
    return None


def _want_cuda() -> bool:
    mode = os.environ.get("TINYCHAT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"TINYCHAT_CUDA must be auto, 0 or 1 (got {mode!r})")
    if mode == "0":
        return False
    problem = _cuda_toolkit_problem()
    if problem is None:
        return True
    hint = "export CUDA_HOME=<toolkit root> (e.g. /usr/local/cuda-13.0) to build the CUDA kernels"
    if mode == "1":
        sys.exit(f"TINYCHAT_CUDA=1 but the CUDA kernels cannot be built: {problem}; {hint}")
    print(f"WARNING: building tinychat CPU-only: {problem}; {hint}", file=sys.stderr)
    return False


def _nvidia_pip_include_dirs() -> list[str]:
    """Header folders of the pip NVIDIA wheels installed beside torch.

    A bare toolkit may lack headers that ATen's CUDA headers include (cublas_v2.h,
    cusparse.h); the wheels ship them: CUDA 13 in one folder (nvidia/cu13/include), CUDA 12
    one folder per library (nvidia/cublas/include, nvidia/cusparse/include, ...).
    """
    import torch

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    bases = list(spec.submodule_search_locations)
    major = torch.version.cuda.split(".")[0]
    merged = [os.path.join(b, f"cu{major}", "include") for b in bases]
    if any(os.path.isdir(d) for d in merged):
        return [d for d in merged if os.path.isdir(d)]
    wanted = ("cublas_v2.h", "cusparse.h")
    return sorted(
        d
        for b in bases
        for d in glob.glob(os.path.join(b, "*", "include"))
        if any(os.path.isfile(os.path.join(d, h)) for h in wanted)
    )


def _extension():
    with_cuda = _want_cuda()
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: BuildExtension adds the standard the installed torch needs (C++20 for
    # recent torch, whose headers refuse C++17).
    # -fopenmp: at::parallel_for is only parallel when this code itself is built with OpenMP.
    cxx_flags = ["-O3", "-fopenmp"]
    # The rpath lets `import tinychat._C` find libc10/libtorch even before `import torch`.
    kwargs = dict(extra_link_args=["-fopenmp", f"-Wl,-rpath,{cpp_extension.TORCH_LIB_PATH}"])
    if not with_cuda:
        return cpp_extension.CppExtension(
            "tinychat._C", sources, extra_compile_args={"cxx": cxx_flags}, **kwargs
        )

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # unset: torch would probe the (absent) GPUs
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    ext = cpp_extension.CUDAExtension(
        "tinychat._C",
        sources,
        define_macros=[("TINYCHAT_WITH_CUDA", None)],
        extra_compile_args={
            "cxx": cxx_flags,
            # No --use_fast_math: the norms must stay exact. --resource-usage: ptxas reports each kernel's
            # registers, spills and shared memory, which the build records (_KernelResources).
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "--resource-usage"],
        },
        **kwargs,
    )
    # After the toolkit's own include folder, so they only fill in missing headers.
    ext.include_dirs += _nvidia_pip_include_dirs()
    return ext


def _tell(line: str) -> None:
    """Show a line to the user: pip hides a build's output unless it fails, so on the terminal when there is one."""
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(line + "\n")
    except OSError:
        print(line, file=sys.stderr, flush=True)


class _KernelResources:
    """ptxas's report of every CUDA kernel (--resource-usage), read from the compiler output as ninja relays it, kept
    in tinychat/cuda_resources.json: {arch: {kernel (mangled): {source, registers, stack_bytes, spill_store_bytes,
    spill_load_bytes, smem_bytes}}}. tests/test_cuda_resources.py reads it. Sources that an incremental build does
    not recompile keep their earlier entries."""

    _ENTRY = re.compile(rb"ptxas info\s*: Compiling entry function '(\S+)' for '(sm_\w+)'")
    _FRAME = re.compile(rb"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
    _USED = re.compile(rb"ptxas info\s*: Used (\d+) registers(?:.*?(\d+) bytes smem)?")

    def __init__(self):
        self.kernels = {}  # (arch, kernel) -> entry
        self.sources = set()  # sources compiled in this build
        self._source = None
        self._current = None

    def compiled(self, source: str) -> None:
        self._source = source
        self.sources.add(source)

    def line(self, line: bytes) -> None:
        entry = self._ENTRY.search(line)
        if entry:
            arch, kernel = entry[2].decode(), entry[1].decode()
            self._current = self.kernels.setdefault((arch, kernel), {"source": self._source})
            return
        if self._current is None:
            return
        frame = self._FRAME.search(line)
        if frame:
            self._current.update(stack_bytes=int(frame[1]), spill_store_bytes=int(frame[2]),
                                 spill_load_bytes=int(frame[3]))
        used = self._USED.search(line)
        if used:
            self._current.update(registers=int(used[1]), smem_bytes=int(used[2] or 0))

    def write(self, path: str) -> None:
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        merged = {arch: {k: e for k, e in kernels.items() if e.get("source") not in self.sources}
                  for arch, kernels in old.items()}
        for (arch, kernel), entry in self.kernels.items():
            merged.setdefault(arch, {})[kernel] = entry
        with open(path, "w") as f:
            json.dump(merged, f, indent=1, sort_keys=True)
            f.write("\n")


@contextlib.contextmanager
def _ninja_progress(resources: _KernelResources):
    """Passes ninja's output (on fd 1) through unchanged, tells the user each source it has compiled, and hands
    every line to `resources`."""
    sys.stdout.flush()
    read_end, write_end = os.pipe()
    out = os.dup(1)
    os.dup2(write_end, 1)
    os.close(write_end)

    def relay():
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                os.write(out, line)
                # ninja -v, once a source is compiled (its compiler output follows): "[3/9] c++ ... -c SRC -o OBJ ..."
                done = re.match(rb"\[(\d+/\d+)\] .* -c (\S+) -o ", line)
                if done:
                    source = os.path.relpath(done[2].decode(), ROOT)
                    resources.compiled(source)
                    _tell(f"tinychat: compiled {done[1].decode()}: {source}")
                elif line.startswith(b"ninja: no work to do"):
                    _tell("tinychat: every object is up to date")
                else:
                    resources.line(line)

    thread = threading.Thread(target=relay)
    thread.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(out, 1)  # closes the pipe's last write end: relay() reaches its end
        thread.join()
        os.close(out)


class _BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension (ninja) that says what it compiles and keeps its objects between editable installs."""

    def finalize_options(self):
        super().finalize_options()
        if self.editable_mode:  # setuptools would compile in a new temporary folder: every install from scratch
            self.build_temp = os.path.join(ROOT, "build", "editable-temp")

    def run(self):
        # setuptools clears `inplace` while it builds (then copies the extension into the sources): note it first.
        self._into_sources = bool(self.inplace or self.editable_mode)
        super().run()

    def build_extension(self, ext):
        cuda = any(s.endswith(".cu") for s in ext.sources)
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        kernels = f"CPU and CUDA kernels (CUDA_HOME={cpp_extension.CUDA_HOME}, arch {arch})" if cuda else "CPU kernels"
        _tell(f"tinychat: compiling the {kernels}: {len(ext.sources)} sources, from scratch "
              f"{'3 to 5' if cuda else '1 to 2'} minutes on 2 cores (MAX_JOBS sets the parallel jobs)...")
        start = time.monotonic()
        resources = _KernelResources()
        with _ninja_progress(resources):
            super().build_extension(ext)
        if cuda:  # beside the package's sources when built in place (editable), else into the build's package
            package = os.path.join(ROOT, "tinychat") if self._into_sources else os.path.dirname(
                self.get_ext_fullpath(ext.name))
            resources.write(os.path.join(package, "cuda_resources.json"))
        _tell(f"tinychat: built {ext.name} in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":  # as setuptools runs it; tests import this file for _KernelResources
    setup(ext_modules=[_extension()], cmdclass={"build_ext": _BuildExtension.with_options(use_ninja=True)})

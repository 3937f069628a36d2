"""Builds the tinychat._C extension (metadata lives in pyproject.toml).

    CUDA_HOME=/usr/local/cuda-13.0 MAX_JOBS=2 pip install --no-build-isolation -e .

Environment:
    TINYCHAT_CUDA          auto (default): build the CUDA kernels when torch has CUDA and a
                           toolkit is found; 1: require them; 0: CPU only.
    CUDA_HOME              the CUDA toolkit root (must contain include/cuda_runtime.h).
    TORCH_CUDA_ARCH_LIST   GPU architectures to compile for; default "8.0;9.0".
    MAX_JOBS               parallel compile jobs (ninja).
"""

import glob
import importlib.util
import os
import sys

from setuptools import setup
from torch.utils import cpp_extension

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
        print("tinychat: building the CPU kernels only", file=sys.stderr)
        return cpp_extension.CppExtension(
            "tinychat._C", sources, extra_compile_args={"cxx": cxx_flags}, **kwargs
        )

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # unset: torch would probe the (absent) GPUs
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    print(
        f"tinychat: building the CPU and CUDA kernels (CUDA_HOME={cpp_extension.CUDA_HOME}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})",
        file=sys.stderr,
    )
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    ext = cpp_extension.CUDAExtension(
        "tinychat._C",
        sources,
        define_macros=[("TINYCHAT_WITH_CUDA", None)],
        extra_compile_args={
            "cxx": cxx_flags,
            # No --use_fast_math: the norms must stay exact.
            "nvcc": ["-O3", "--expt-relaxed-constexpr"],
        },
        **kwargs,
    )
    # After the toolkit's own include folder, so they only fill in missing headers.
    ext.include_dirs += _nvidia_pip_include_dirs()
    return ext


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)

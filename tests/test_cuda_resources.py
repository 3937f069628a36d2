"""The CUDA kernels' resources as ptxas reported them when tinychat._C was built (setup.py records them in
tinychat/cuda_resources.json): no hot kernel spills registers to local memory, and no launch needs more shared
memory than its launcher asks for. These run wherever the extension was built with its CUDA kernels (CI does), GPU
or not; they skip where it was built CPU-only."""

import importlib.util
import json
from pathlib import Path

import pytest

from tinychat import ops

# The kernels whose speed the model's speed is: the int4 GEMV and GEMM main loop, decode and prefill attention.
HOT = ("int4_gemv_kernel", "int4_gemm_kernel", "split_kv_kernel", "prefill_kernel")
# Kernels launched without an opt-in attribute: static + dynamic shared memory must stay within 48 KB; their dynamic
# part is sized by their launchers and header helpers (tested in test_int4_linear_cuda.py), so static must be 0.
NO_STATIC_SMEM = ("int4_gemv_kernel", "int4_gemm_kernel")
SMEM_48K = 48 * 1024
# Per-block shared memory a kernel may opt in to, by architecture (CUDA programming guide, compute capabilities).
OPT_IN_SMEM = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024}
PREFILL_SMEM = {64: 4 * 64 * (64 + 8) * 2, 128: 4 * 64 * (128 + 8) * 2}  # attention_plan.h prefill_smem_bytes


@pytest.fixture(scope="module")
def resources():
    assert ops.EXTENSION_AVAILABLE, "tinychat._C is not built: pip install --no-build-isolation -e ."
    import tinychat._C

    if not tinychat._C.WITH_CUDA:
        pytest.skip("tinychat._C was built without its CUDA kernels")
    path = Path(tinychat._C.__file__).parent / "cuda_resources.json"
    assert path.is_file(), (f"{path} is missing: the CUDA build writes it; rebuild from scratch "
                            "(rm -rf build/editable-temp; pip install --no-build-isolation -e .)")
    data = json.loads(path.read_text())
    assert data, f"{path} lists no kernels"
    return data


def test_every_architecture_has_every_hot_kernel(resources):
    for arch, kernels in resources.items():
        for hot in HOT:
            assert any(hot in name for name in kernels), f"{arch}: no {hot} in the build's ptxas report"
        for name, entry in kernels.items():
            assert {"registers", "spill_store_bytes", "spill_load_bytes", "smem_bytes", "source"} <= entry.keys(), name


def test_hot_kernels_do_not_spill(resources):
    spilling = [(arch, name, e["spill_store_bytes"], e["spill_load_bytes"])
                for arch, kernels in resources.items() for name, e in kernels.items()
                if any(hot in name for hot in HOT) and (e["spill_store_bytes"] or e["spill_load_bytes"])]
    assert not spilling, f"hot kernels spill registers (arch, kernel, store bytes, load bytes): {spilling}"


def test_shared_memory_fits_what_the_launchers_ask(resources):
    for arch, kernels in resources.items():
        for name, e in kernels.items():
            if any(k in name for k in NO_STATIC_SMEM):
                assert e["smem_bytes"] == 0, f"{arch} {name}: static shared memory on top of its 48 KB dynamic tile"
            elif "prefill_kernel" in name:
                D = 128 if "Li128E" in name else 64
                limit = OPT_IN_SMEM.get(arch)
                if limit is not None:
                    assert e["smem_bytes"] + PREFILL_SMEM[D] <= limit, f"{arch} {name}: over the opt-in limit"
            else:  # launched with static shared memory only
                assert e["smem_bytes"] <= SMEM_48K, f"{arch} {name}: {e['smem_bytes']} bytes of static shared memory"


def test_resource_report_parser():
    """setup.py's reader of ptxas's report, on the lines nvcc prints (a ninja status line names the source)."""
    spec = importlib.util.spec_from_file_location("tinychat_setup", Path(__file__).parents[1] / "setup.py")
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)  # defines the build's helpers; setup() runs only as __main__
    r = setup_py._KernelResources()
    r.compiled("csrc/cuda/x.cu")
    for line in [b"ptxas info    : Compiling entry function '_Z6kernelv' for 'sm_90'",
                 b"ptxas info    : Function properties for _Z6kernelv",
                 b"    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads",
                 b"ptxas info    : Used 168 registers, used 1 barriers, 16640 bytes smem, 400 bytes cmem[0]",
                 b"ptxas info    : Compiling entry function '_Z5otherv' for 'sm_80'",
                 b"    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
                 b"ptxas info    : Used 32 registers, used 0 barriers, 380 bytes cmem[0]"]:
        r.line(line)
    assert r.kernels[("sm_90", "_Z6kernelv")] == {"source": "csrc/cuda/x.cu", "stack_bytes": 8,
                                                  "spill_store_bytes": 12, "spill_load_bytes": 4, "registers": 168,
                                                  "smem_bytes": 16640}
    assert r.kernels[("sm_80", "_Z5otherv")]["smem_bytes"] == 0

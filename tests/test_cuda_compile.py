"""Every cuda/*.cu compiles with nvcc (C++17, sm_90) against the installed torch's headers.

This keeps the CUDA kernels from rotting on machines without a GPU or a CUDA build of torch. The kernels' numerics
are tested on a GPU; here only compilation is checked. Skipped (with the reason) only when nvcc is absent.
"""

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "cuda").glob("*.cu"))


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    return shutil.which("nvcc") or (str(candidate) if candidate.exists() else None)


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")


def nvcc_command(src: Path, obj: Path) -> list[str]:
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"],
                str(ROOT / "cpp" / "kernels"), str(ROOT / "cpp" / "engine")]
    launcher = [shutil.which("ccache")] if shutil.which("ccache") else []  # reruns on unchanged sources are instant
    cmd = [
        *launcher, NVCC, "-c", "-std=c++17", "-gencode", "arch=compute_90,code=sm_90",
        # the same flags as CMakeLists.txt's CUDA build
        "--expt-relaxed-constexpr", "-diag-suppress=3306", "-Xcompiler=-fPIC,-Wno-c++20-extensions",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
        *[f"-I{p}" for p in includes],
    ]
    # A CPU-only torch ships c10/cuda headers but not this one generated header; the macro makes c10 skip it.
    if not any((Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for p in includes):
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return [*cmd, "-o", str(obj), str(src)]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """Compile every .cu file, two nvcc processes at a time: (object dir, results by file name)."""
    out_dir = tmp_path_factory.mktemp("nvcc")

    def compile_one(src: Path) -> subprocess.CompletedProcess:
        cmd = nvcc_command(src, out_dir / (src.stem + ".o"))
        return subprocess.run(cmd, capture_output=True, text=True, timeout=900)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip([f.name for f in CU_FILES], pool.map(compile_one, CU_FILES)))
    return out_dir, results


def test_there_are_cuda_sources():
    assert {"rms_norm.cu", "rope.cu", "silu_mul.cu", "attention.cu"} <= {f.name for f in CU_FILES}


@pytest.mark.parametrize("name", [f.name for f in CU_FILES])
def test_cuda_source_compiles(compiled, name):
    out_dir, results = compiled
    result = results[name]
    assert result.returncode == 0, f"nvcc failed on cuda/{name}:\n{result.stdout}\n{result.stderr}"
    assert (out_dir / (Path(name).stem + ".o")).stat().st_size > 0


@pytest.mark.parametrize("name", ["engine.cpp", "scheduler.cpp"])
def test_engine_cuda_path_compiles(tmp_path, name):
    """The engine's CUDA-graph decode path and the batching scheduler (built with CUDA) compile against torch's
    CUDA headers."""
    *flags, out_flag, obj, src = nvcc_command(ROOT / "cpp" / "engine" / name, tmp_path / (name + ".o"))
    cmd = [*flags, "-DLLAMA_MM_WITH_CUDA", "-x", "c++", out_flag, obj, src]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{name} with LLAMA_MM_WITH_CUDA:\n{result.stdout}\n{result.stderr}"

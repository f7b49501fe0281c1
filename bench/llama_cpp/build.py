"""Fetch llama.cpp (vendored in the `llama-cpp-python` source package on PyPI) and build its CPU `llama-bench` and
`llama-quantize` into a cache directory outside the repository (llama.cpp's code and binaries are never committed).

    python bench/llama_cpp/build.py [--cache /work/tmp_llamacpp] [--version 0.3.36]

Layout of the cache: src/llama_cpp_python-VERSION.tar.gz (the sdist), src/llama_cpp_python-VERSION/ (unpacked),
build-VERSION/bin/{llama-bench,llama-quantize}. Release, CPU only, -DGGML_NATIVE=ON (the running CPU's
instructions), no curl; built with `nice -n 10` and -j2 (the machine is shared). Each step is skipped when its output
exists, so a second call only returns the paths.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path("/work/tmp_llamacpp")
DEFAULT_VERSION = "0.3.36"  # vendors ggml-org/llama.cpp@0c1e57098 (its CHANGELOG)
TARGETS = ("llama-bench", "llama-quantize")


@dataclass(frozen=True)
class LlamaCpp:
    source: Path  # vendor/llama.cpp of the unpacked sdist
    bin: Path  # holds llama-bench and llama-quantize
    package_version: str  # llama-cpp-python's version
    commit: str  # llama.cpp commit the package vendors, from its CHANGELOG ("unknown" when not found)

    @property
    def gguf_py(self) -> Path:
        """llama.cpp's own gguf-py (the `gguf` package of the same commit)."""
        return self.source / "gguf-py"

    def tool(self, name: str) -> Path:
        return self.bin / name


def run(command: list[str], cwd: Path | None = None):
    print("+", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=cwd)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed with exit code {done.returncode}")


def vendored_commit(package_dir: Path, version: str) -> str:
    """The llama.cpp commit named under this version's heading in llama-cpp-python's CHANGELOG."""
    text = (package_dir / "CHANGELOG.md").read_text()
    section = text.split(f"## [{version}]", 1)[-1].split("\n## [", 1)[0]
    found = re.search(r"ggml-org/llama\.cpp@([0-9a-f]{7,40})", section)
    return found.group(1) if found else "unknown"


def fetch(cache: Path, version: str) -> Path:
    """The unpacked llama-cpp-python sdist (downloaded with pip, no binary, no dependencies)."""
    src = cache / "src"
    package_dir = src / f"llama_cpp_python-{version}"
    if not (package_dir / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        sdist = src / f"llama_cpp_python-{version}.tar.gz"
        if not sdist.exists():
            run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-binary", ":all:",
                 "--no-deps", "-d", str(src)])
        with tarfile.open(sdist) as tar:
            tar.extractall(src, filter="data")
    return package_dir


def build(cache: Path = DEFAULT_CACHE, version: str = DEFAULT_VERSION) -> LlamaCpp:
    package_dir = fetch(cache, version)
    source = package_dir / "vendor" / "llama.cpp"
    commit = vendored_commit(package_dir, version)
    build_dir = cache / f"build-{version}"
    found = LlamaCpp(source=source, bin=build_dir / "bin", package_version=version, commit=commit)
    if all(found.tool(t).exists() for t in TARGETS):
        return found
    run(["cmake", "-S", str(source), "-B", str(build_dir), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
         "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
         f"-DLLAMA_BUILD_COMMIT={commit}", "-DCMAKE_C_COMPILER_LAUNCHER=ccache",
         "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"])
    run(["nice", "-n", "10", "cmake", "--build", str(build_dir), "-j2", "--target", *TARGETS])
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--version", default=DEFAULT_VERSION, help="llama-cpp-python version whose llama.cpp to build")
    args = ap.parse_args()
    found = build(args.cache, args.version)
    print(f"llama.cpp {found.commit} (llama-cpp-python {found.package_version}): {found.bin}")


if __name__ == "__main__":
    main()

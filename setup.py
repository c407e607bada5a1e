"""Builds pysparse._C: the C++ (CPU, OpenMP) kernels, plus the CUDA kernels when CUDA can be built.

CUDA is built when torch is a CUDA build and a CUDA toolkit is found (CUDA_HOME, else /usr/local/cuda).
Environment overrides:
  FORCE_CUDA=1          build the CUDA kernels (fail if impossible), GPU or not
  FORCE_CPU=1           build the CPU kernels only
  TORCH_CUDA_ARCH_LIST  GPU architectures (default without a visible GPU: "8.0;9.0")
  PYSPARSE_PORTABLE=1   no -march=native (for binaries that move to another CPU)
  DEBUG=1               -O0 -g
"""
import glob
import os

# torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper script; prefer the real toolkit.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _want_cuda() -> bool:
    if _flag("FORCE_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        if torch.version.cuda is None:
            raise RuntimeError("FORCE_CUDA=1 but torch is a CPU-only build")
        if CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


class BuildExt(BuildExtension):
    """BuildExtension whose object files live in ./build/ even in an editable install (which otherwise
    compiles into a fresh temporary directory every time), so that ninja rebuilds only what changed."""

    def run(self):
        self.build_temp = os.path.join(HERE, "build", "temp-" + ("cuda" if _want_cuda() else "cpu"))
        super().run()


def get_extensions():
    debug = _flag("DEBUG")
    use_cuda = _want_cuda()
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-fopenmp", "-fdiagnostics-color=always"]
    if not _flag("PYSPARSE_PORTABLE"):
        cxx.append("-march=native")
    else:  # 64-byte vectors (csrc/cpu/vec.h) pass only between inline functions: the ABI note does not apply
        cxx.append("-Wno-psabi")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    depends = sorted(glob.glob("csrc/**/*.h", recursive=True)) + sorted(glob.glob("csrc/cuda/*.cuh"))
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"], depends=depends)
    if use_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["extra_compile_args"]["nvcc"] = opt + ["-lineinfo"]
        print(f"pysparse: building CPU + CUDA kernels (arch {os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')})")
        return [CUDAExtension("pysparse._C", sources, **kwargs)]
    print("pysparse: building CPU kernels only")
    return [CppExtension("pysparse._C", sources, **kwargs)]


setup(
    packages=find_packages(include=["pysparse", "pysparse.*"]),
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)

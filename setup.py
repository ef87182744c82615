"""Build rnn_ext._C: a CUDAExtension when torch has CUDA and nvcc is found, else a CppExtension."""
import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extension():
    csrc = os.path.join(ROOT, "csrc")
    sources = rel(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    cxx = ["-O3", "-fvisibility=hidden"]
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        # at::parallel_for is a header template whose OpenMP pragmas are compiled into the
        # caller: without -fopenmp they are ignored and every parallel_for in csrc/cpu runs on
        # one thread.  Compile flag only: the OpenMP runtime is the one torch has loaded
        # (linking -lgomp would load a second runtime with a second thread pool).
        cxx.append("-fopenmp")
    with_cuda = (
        torch.cuda.is_available() or os.environ.get("RNN_EXT_FORCE_CUDA") == "1"
    ) and torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("RNN_EXT_NO_CUDA") == "1":
        with_cuda = False
    if not with_cuda:
        # The CUDA glue is only compiled with CUDA.
        sources = [s for s in sources if not s.endswith("cuda_glue.cpp")]
        return CppExtension(
            "rnn_ext._C", sources, include_dirs=[csrc], extra_compile_args={"cxx": cxx},
            py_limited_api=False,
        )
    sources += rel(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    nvcc = ["-O3", "-std=c++17", "-lineinfo"]
    # Target architectures: torch's cpp_extension reads TORCH_CUDA_ARCH_LIST, else builds for
    # the visible card(s).  Without either (RNN_EXT_FORCE_CUDA=1 on a machine without a GPU) it
    # would build for every architecture it knows; build for A100 and H100/H200 instead.
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return CUDAExtension(
        "rnn_ext._C", sources, include_dirs=[csrc],
        define_macros=[("RNN_EXT_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )


setup(
    name="rnn_ext",
    version="0.1.0",
    description="A drop-in torch.nn.RNN on fused C++/CUDA kernels",
    packages=find_packages(include=["rnn_ext", "rnn_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    # Built and tested against torch 2.13 (CPU) and torch 2.11 (CUDA 13).
    install_requires=["torch>=2.11,<2.14"],
    extras_require={"test": ["pytest", "numpy", "hypothesis", "expecttest"],
                    "bench": ["matplotlib", "numpy"]},
    zip_safe=False,
)

"""Runs the CUDA kernels of dynconv/sparse/cuda_kernels.py on the CPU, for testing without a GPU.

The kernel sources, exactly as the cupy backend compiles them, get a prelude that makes them plain C++ (thread
coordinates become globals) and, per kernel, a driver that visits every block and thread of the launch in turn.
g++ builds the lot into a shared library, loaded with ctypes. Running the threads one after another is exact for
these kernels: they use no shared memory, barriers or warp operations, and no two threads touch the same element.
"""
import ctypes
import hashlib
import os
import re
import subprocess
import tempfile

import torch

from dynconv.sparse.cuda_kernels import launch_config, make_ops

PRELUDE = r"""
#include <math.h>  // the CUDA math functions a kernel may call (fmaxf, expf...): same names in C
struct EmulatedDim3 { unsigned int x, y, z; };
static EmulatedDim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
template <typename T> static T atomicAdd(T* address, T value) { T old = *address; *address = old + value; return old; }
"""

# The driver of kernel NAME, emulate_NAME(grid x, y, z, block x, y, z, kernel parameters...).
DRIVER = r"""
extern "C" void emulate_{name}(unsigned int gx, unsigned int gy, unsigned int gz,
                               unsigned int bx, unsigned int by, unsigned int bz, {params}) {{
    gridDim = {{gx, gy, gz}};
    blockDim = {{bx, by, bz}};
    for (blockIdx.z = 0; blockIdx.z < gz; ++blockIdx.z)
    for (blockIdx.y = 0; blockIdx.y < gy; ++blockIdx.y)
    for (blockIdx.x = 0; blockIdx.x < gx; ++blockIdx.x)
    for (threadIdx.z = 0; threadIdx.z < bz; ++threadIdx.z)
    for (threadIdx.y = 0; threadIdx.y < by; ++threadIdx.y)
    for (threadIdx.x = 0; threadIdx.x < bx; ++threadIdx.x)
        {name}({args});
}}
"""

CXX_FLAGS = ["-O1", "-shared", "-fPIC", "-std=c++14"]

# Parameter types the kernels use: scalars as ctypes types, pointees as the dtype the tensor must have.
SCALAR_TYPES = {"long long": ctypes.c_longlong, "int": ctypes.c_int, "float": ctypes.c_float}
POINTEE_DTYPES = {"float": torch.float32, "long long": torch.int64}


def parse_signature(name, source):
    """[(parameter name, base type, is pointer)] of kernel `name`, from its `extern "C" __global__` definition."""
    match = re.search(r'extern\s+"C"\s+__global__\s+void\s+' + name + r"\s*\(([^)]*)\)", source)
    if match is None:
        raise ValueError(f'no extern "C" __global__ void {name}(...) in its source')
    params = []
    for decl in match.group(1).split(","):
        *type_words, param = decl.replace("*", " * ").split()
        pointer = "*" in type_words
        base = " ".join(w for w in type_words if w not in ("const", "__restrict__", "*"))
        params.append((param, base, pointer))
    return params


class EmulatedKernels:
    """The kernels of `sources` ({name: CUDA source}) compiled for the CPU; launch() mirrors the cupy launcher."""

    def __init__(self, sources):
        self.signatures = {name: parse_signature(name, src) for name, src in sources.items()}
        parts = [PRELUDE] + list(sources.values())
        for name, params in self.signatures.items():
            decls = ", ".join(f"{base} {'*' if ptr else ''}{param}" for param, base, ptr in params)
            parts.append(DRIVER.format(name=name, params=decls, args=", ".join(p for p, _, _ in params)))
        self.library = ctypes.CDLL(build("\n".join(parts)))
        self.functions = {}
        for name, params in self.signatures.items():
            fn = getattr(self.library, f"emulate_{name}")
            fn.restype = None
            fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_void_p if ptr else SCALAR_TYPES[base]
                                                 for _, base, ptr in params]
            self.functions[name] = fn

    def launch(self, name, total, *args):
        """Runs kernel `name` on CPU tensors and ints, followed by `total`, with launch_config(total)."""
        args = args + (total,)
        params = self.signatures[name]
        if len(args) != len(params):
            raise TypeError(f"{name} takes {len(params)} arguments, got {len(args)}")
        values = []
        # ctypes would take an int for a pointer (and crash), so match every argument to its parameter first.
        for arg, (param, base, pointer) in zip(args, params):
            if pointer:
                if not isinstance(arg, torch.Tensor) or arg.dtype != POINTEE_DTYPES[base]:
                    raise TypeError(f"{name}: {param} must be a {POINTEE_DTYPES[base]} tensor, got {arg!r:.60}")
                if arg.device.type != "cpu" or not arg.is_contiguous():
                    raise TypeError(f"{name}: {param} must be a contiguous CPU tensor")
                values.append(arg.data_ptr())
            else:
                if not isinstance(arg, int):
                    raise TypeError(f"{name}: {param} must be an int, got {type(arg).__name__}")
                values.append(arg)
        grid, block = launch_config(total)
        self.functions[name](*grid, *block, *values)

    def ops(self):
        """The cupy backend's op table (cuda_kernels.make_ops), running on these CPU kernels."""
        return make_ops(self.launch)


def build(source):
    """Path of the shared library compiled from C++ `source`, cached by content in the temp directory."""
    key = hashlib.sha256("\0".join(CXX_FLAGS + [source]).encode()).hexdigest()[:16]
    directory = os.path.join(tempfile.gettempdir(), "dynconv_cuda_emulation")
    library = os.path.join(directory, f"kernels_{key}.so")
    if not os.path.exists(library):
        os.makedirs(directory, exist_ok=True)
        cpp = os.path.join(directory, f"kernels_{key}.cpp")
        with open(cpp, "w") as f:
            f.write(source)
        partial = f"{library}.{os.getpid()}.tmp"  # then renamed: concurrent builds never load a half-written file
        result = subprocess.run(["g++", *CXX_FLAGS, "-o", partial, cpp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"g++ failed on {cpp}:\n{result.stderr}")
        os.replace(partial, library)
    return library

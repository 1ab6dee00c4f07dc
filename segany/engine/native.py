"""segany's own CPU kernels in C (segany/modeling/csrc), compiled on first use and loaded with ctypes.

PyTorch runs the mask decoder's image-side work as chains of separate operations, each a pass over
megabytes of intermediates: the upscaling (two products, a layer norm, two GELUs, the hypernetwork
product) and, in each two-way block, the image's attention to the tokens (logits, softmax, values,
residual, layer norm), and the resize of the masks to the image. The kernels in csrc/decoder_bf16.c
run a few pixels (or rows) at a time through a whole chain. They need a CPU with AVX-512 BF16 and a
C compiler: the source is compiled once per machine into the user's cache folder
(the file's name carries a hash of the source, the flags and the compiler, so a changed source is
compiled again) and loaded from there. Without either, or with SEGANY_NATIVE=0 in the environment,
`library()` returns None and the callers keep their PyTorch path (same results up to rounding).

The kernels use OpenMP; on Linux they bind to the OpenMP runtime PyTorch has already loaded (the
same libgomp.so.1), and are given PyTorch's thread count on every call.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "decoder_bf16.c"
FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]
ABI = 1
# Set to "0" to keep every caller on its PyTorch path.
ENV_SWITCH = "SEGANY_NATIVE"


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU has the AVX-512 BF16 instructions the kernels use (Linux: /proc/cpuinfo)."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma"} <= flags
    except OSError:
        return False
    return False


def _compiler() -> Optional[str]:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        found = shutil.which(candidate) if candidate else None
        if found:
            return found
    return None


def cache_dir() -> Path:
    import platformdirs

    return Path(os.environ.get("SEGANY_NATIVE_CACHE") or Path(platformdirs.user_cache_dir("segany")) / "native")


def _build(compiler: str, source: Path = SOURCE) -> Path:
    """Compile `source` (if this source, compiler and flags have not been compiled before) and return
    the library's path. The library is written to a temporary name and renamed into place, so a
    concurrent or interrupted build never leaves a half-written file under the final name."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # what the sources include
    key = hashlib.sha256(source.read_bytes() + headers + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, f"-I{source.parent}", str(source), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, f, l = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_long
    lib.segany_native_abi.restype = i
    lib.segany_native_abi.argtypes = []
    lib.segany_gelu_f32.restype = None
    lib.segany_gelu_f32.argtypes = [p, p, l]
    lib.segany_upscale_logits_bf16.restype = None
    lib.segany_upscale_logits_bf16.argtypes = [p, i, i, i, i, i, p, p, p, p, f, p, p, p, i, p, i]
    lib.segany_image_to_tokens_bf16.restype = None
    lib.segany_image_to_tokens_bf16.argtypes = [p, l, i, p, i, p, p, p, i, p, p, f, p, i]
    lib.segany_resize_masks.restype = None
    lib.segany_resize_masks.argtypes = [p, i, i, i, p, p, p, p, p, i, i, f, i, p, i]
    return lib


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None where they cannot run here (the reason is logged once)."""
    return load(SOURCE, _declare, lambda lib: lib.segany_native_abi() == ABI, "native kernels")


def load(
    source: Path, declare: Callable[[ctypes.CDLL], ctypes.CDLL], abi_matches: Callable[[ctypes.CDLL], bool], name: str
) -> Optional[ctypes.CDLL]:
    """The library compiled from `source` with its functions declared, or None where it cannot run
    here: SEGANY_NATIVE=0, no AVX-512 BF16, no C compiler, or a failed build (the reason is logged)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if not cpu_has_avx512_bf16():
        logger.info("segany %s: this CPU has no AVX-512 BF16; using PyTorch's operations", name)
        return None
    compiler = _compiler()
    if compiler is None:
        logger.info("segany %s: no C compiler found; using PyTorch's operations", name)
        return None
    try:
        import torch  # noqa: F401  (its OpenMP runtime is loaded first, and the kernels bind to it)

        lib = declare(ctypes.CDLL(str(_build(compiler, source))))
        if not abi_matches(lib):
            raise RuntimeError(f"the compiled {name} do not match this version of segany")
        return lib
    except Exception as err:  # any failure: the PyTorch path is always there
        logger.warning("segany %s unavailable (%s: %s); using PyTorch's operations", name, type(err).__name__, err)
        return None

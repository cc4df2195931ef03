"""Build mamba-ssm's ``selective_scan_cuda`` extension from its sdist for one GPU architecture only.

``pip install mamba-ssm`` compiles the selective scan for every architecture from sm_75 to sm_121 (5-8 minutes on
16 cores, much longer on a laptop); ``layers.scan.cuda`` only needs the ``selective_scan_cuda`` module for the GPU
at hand, which takes about a minute. The source list, include dirs and nvcc flags are read from the sdist's own
setup.py, the ``-gencode`` list is replaced by the one architecture, and the C++ standard follows the torch headers
(torch >= 2.12 needs C++20).

    python scripts/build_mamba_kernel.py                      # sdist found in third_party/, arch from the GPU
    python scripts/build_mamba_kernel.py --install            # also copy the module into site-packages
    CSM_CUDA_ARCH=90 python scripts/build_mamba_kernel.py     # no GPU needed: compile for sm_90

Prints one JSON line (module path, architecture, seconds). ``build_kernel()`` is the same as a function.
"""

import argparse
import ast
import json
import os
import re
import shutil
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THIRD_PARTY = REPO / "third_party"
MAMBA_VERSION = "2.3.2.post1"
MODULE = "selective_scan_cuda"
ARCH_ENV = "CSM_CUDA_ARCH"

# What mamba-ssm 2.3.2.post1's setup.py builds; used when its setup.py cannot be parsed (a newer layout).
FALLBACK_SOURCES = [
    "csrc/selective_scan/selective_scan.cpp",
    "csrc/selective_scan/selective_scan_fwd_fp32.cu",
    "csrc/selective_scan/selective_scan_fwd_fp16.cu",
    "csrc/selective_scan/selective_scan_fwd_bf16.cu",
    "csrc/selective_scan/selective_scan_bwd_fp32_real.cu",
    "csrc/selective_scan/selective_scan_bwd_fp32_complex.cu",
    "csrc/selective_scan/selective_scan_bwd_fp16_real.cu",
    "csrc/selective_scan/selective_scan_bwd_fp16_complex.cu",
    "csrc/selective_scan/selective_scan_bwd_bf16_real.cu",
    "csrc/selective_scan/selective_scan_bwd_bf16_complex.cu",
]
FALLBACK_NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
    "--ptxas-options=-v",
    "-lineinfo",
]
FALLBACK_CXX_FLAGS = ["-O3", "-std=c++17"]
# Dropped from setup.py's list: register-usage reports for every kernel would bury the build log.
NOISY_FLAGS = {"--ptxas-options=-v"}


class BuildError(RuntimeError):
    """The kernel cannot be built here (no sdist, no nvcc, no architecture)."""


# --- the sdist ---------------------------------------------------------------------------------------------------
def find_sdist(path=None):
    """Directory of an unpacked mamba-ssm sdist: ``path`` (a directory or a .tar.gz, unpacked next to it), else the
    one ``scripts/fetch_gpu_deps.sh`` left in third_party/."""
    candidates = [Path(path)] if path else [
        THIRD_PARTY / f"mamba_ssm-{MAMBA_VERSION}",
        THIRD_PARTY / "sdist" / f"mamba_ssm-{MAMBA_VERSION}.tar.gz",
    ]
    for candidate in candidates:
        if candidate.is_dir() and (candidate / "setup.py").exists():
            return candidate.resolve()
        if candidate.is_file() and candidate.name.endswith(".tar.gz"):
            target = candidate.parent / candidate.name[: -len(".tar.gz")]
            if not (target / "setup.py").exists():
                with tarfile.open(candidate) as archive:
                    archive.extractall(candidate.parent, filter="data")
            return target.resolve()
    raise BuildError(
        f"no mamba-ssm sdist at {', '.join(str(c) for c in candidates)}: run `bash scripts/fetch_gpu_deps.sh` "
        "(or pass --sdist DIR_OR_TARBALL)"
    )


def _string_list(node):
    if isinstance(node, ast.List) and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        return [e.value for e in node.elts]
    return None


def _call_name(node):
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def read_build_spec(sdist):
    """``{"sources", "include_dirs", "cxx_flags", "nvcc_flags", "from_setup_py"}`` of the selective-scan extension.

    Read from the CUDAExtension(name="selective_scan_cuda", ...) call and the CUDA branch's flag lists of setup.py;
    the architecture list (``cc_flag``) is left out on purpose. Falls back to 2.3.2.post1's values.
    """
    sdist = Path(sdist)
    spec = {"sources": None, "cxx_flags": None, "nvcc_flags": None}
    try:
        tree = ast.parse((sdist / "setup.py").read_text())
    except (OSError, SyntaxError):
        tree = None
    for node in ast.walk(tree) if tree is not None else ():
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        keywords = {k.arg: k.value for k in node.keywords}
        if name == "CUDAExtension" and getattr(keywords.get("name"), "value", None) == MODULE:
            spec["sources"] = _string_list(keywords.get("sources"))
        elif name == "append_nvcc_threads" and node.args:
            arg = node.args[0]
            spec["nvcc_flags"] = _string_list(arg.left if isinstance(arg, ast.BinOp) else arg)
    # The CUDA branch's "cxx" flags: the dict literal whose "nvcc" entry calls append_nvcc_threads.
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.Dict):
            entries = {getattr(k, "value", None): v for k, v in zip(node.keys, node.values)}
            nvcc = entries.get("nvcc")
            if isinstance(nvcc, ast.Call) and _call_name(nvcc) == "append_nvcc_threads":
                spec["cxx_flags"] = _string_list(entries.get("cxx"))
    from_setup = all(spec[k] for k in spec)
    spec = {
        "sources": spec["sources"] or FALLBACK_SOURCES,
        "cxx_flags": spec["cxx_flags"] or FALLBACK_CXX_FLAGS,
        "nvcc_flags": spec["nvcc_flags"] or FALLBACK_NVCC_FLAGS,
    }
    missing = [s for s in spec["sources"] if not (sdist / s).exists()]
    if missing:
        raise BuildError(f"sources missing from the sdist {sdist}: {missing}")
    spec["include_dirs"] = sorted({str((sdist / s).parent) for s in spec["sources"]})
    spec["from_setup_py"] = from_setup
    return spec


# --- the toolchain -----------------------------------------------------------------------------------------------
def cxx_standard(torch_version):
    """C++ standard the torch headers need: C++20 from torch 2.12 on, C++17 before."""
    major, minor = (int(p) for p in re.match(r"(\d+)\.(\d+)", torch_version).groups())
    return "c++20" if (major, minor) >= (2, 12) else "c++17"


def normalise_arch(arch):
    """'9.0', '90', 'sm_90' or (9, 0) -> '90' (a trailing 'a', as in '90a', is kept)."""
    if isinstance(arch, (tuple, list)):
        return f"{arch[0]}{arch[1]}"
    text = str(arch).strip().lower().removeprefix("sm_").removeprefix("compute_")
    match = re.fullmatch(r"(\d+)\.?(\d)([a-z]?)", text)
    if not match:
        raise BuildError(f"cannot read CUDA architecture {arch!r}; write it as 90, 9.0 or sm_90")
    return "".join(match.groups())


def detect_arch():
    """$CSM_CUDA_ARCH if set, else the compute capability of GPU 0."""
    if os.environ.get(ARCH_ENV):
        return normalise_arch(os.environ[ARCH_ENV])
    import torch

    if not torch.cuda.is_available():
        raise BuildError(f"no CUDA device to read the architecture from: set {ARCH_ENV} (e.g. {ARCH_ENV}=90)")
    return normalise_arch(torch.cuda.get_device_capability(0))


def gencode_flags(arch):
    return ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]


def nvcc_flags(spec, arch, torch_version):
    """setup.py's nvcc flags for one architecture, with the C++ standard of these torch headers."""
    std = cxx_standard(torch_version)
    flags = [f for f in spec["nvcc_flags"] if f not in NOISY_FLAGS]
    return [f"-std={std}" if f.startswith("-std=") else f for f in flags] + gencode_flags(arch)


def cxx_flags(spec, torch_version):
    std = cxx_standard(torch_version)
    return [f"-std={std}" if f.startswith("-std=") else f for f in spec["cxx_flags"]]


def find_cuda_home():
    """$CUDA_HOME, else the toolkit that holds both nvcc and cuda_runtime.h (a /usr/local/bin/nvcc wrapper script
    would otherwise make torch guess /usr/local)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = [Path("/usr/local/cuda")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [Path(nvcc).resolve().parents[1], Path(nvcc).parents[1]]
    candidates += sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return str(home)
    raise BuildError("no CUDA toolkit found (nvcc and cuda_runtime.h): set CUDA_HOME")


def default_build_dir(arch, torch_version):
    """build/selective_scan_cuda/sm<arch>-torch<ver>-py<ver> in the repository (git-ignored, never carried)."""
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    return REPO / "build" / MODULE / f"sm{arch}-torch{torch_version.split('+')[0]}-py{py}"


# --- the build ---------------------------------------------------------------------------------------------------
def build_kernel(sdist=None, arch=None, build_dir=None, max_jobs=None, verbose=False):
    """Compile ``selective_scan_cuda`` for one architecture and make ``import selective_scan_cuda`` find it.

    Args:
        sdist: unpacked sdist or tarball (default: the one in third_party/).
        arch: "90", "9.0", ... (default: $CSM_CUDA_ARCH, else GPU 0's compute capability).
        build_dir: where objects and the .so go (default: ``default_build_dir``); put on sys.path.
        max_jobs: parallel compile jobs (default: $MAX_JOBS, else the CPU count).
    Returns:
        dict: module path, arch, torch version, flags, seconds, whether setup.py was parsed and whether an earlier
        build was there to reuse.
    """
    import torch
    from torch.utils import cpp_extension

    start = time.perf_counter()
    sdist = find_sdist(sdist)
    spec = read_build_spec(sdist)
    arch = normalise_arch(arch) if arch else detect_arch()
    cuda_home = find_cuda_home()
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home  # read at import time; the search above may have found a better one
    if max_jobs or not os.environ.get("MAX_JOBS"):
        os.environ["MAX_JOBS"] = str(max_jobs or os.cpu_count() or 1)
    # Only the -gencode we pass: torch would otherwise add the arch list of the GPU it finds, or all of them.
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{arch[0]}.{arch[1:]}"
    build_dir = Path(build_dir) if build_dir else default_build_dir(arch, torch.__version__)
    build_dir.mkdir(parents=True, exist_ok=True)
    nvcc = nvcc_flags(spec, arch, torch.__version__)
    cxx = cxx_flags(spec, torch.__version__)
    sources = [str(sdist / s) for s in spec["sources"]]
    reused = (build_dir / f"{MODULE}.so").exists()  # torch relinks only what changed since
    module = cpp_extension.load(
        name=MODULE,
        sources=sources,
        extra_cflags=cxx,
        extra_cuda_cflags=nvcc,
        extra_include_paths=spec["include_dirs"],
        build_directory=str(build_dir),
        with_cuda=True,
        verbose=verbose,
    )
    sys.modules[MODULE] = module  # so that importlib.import_module(MODULE) returns this very module
    if str(build_dir) not in sys.path:
        sys.path.insert(0, str(build_dir))
    return {
        "module": module.__file__,
        "build_dir": str(build_dir),
        "arch": f"sm_{arch}",
        "torch": torch.__version__,
        "cuda_home": cuda_home,
        "nvcc_flags": nvcc,
        "cxx_flags": cxx,
        "sources": spec["sources"],
        "from_setup_py": spec["from_setup_py"],
        "max_jobs": int(os.environ["MAX_JOBS"]),
        "reused_build_dir": reused,
        "seconds": round(time.perf_counter() - start, 1),
    }


def install_module(path):
    """Copy the built module into this interpreter's site-packages, where mamba-ssm's wheel puts it."""
    target = Path(sysconfig.get_paths()["platlib"]) / Path(path).name
    shutil.copy2(path, target)
    return str(target)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", help="unpacked mamba-ssm sdist or its .tar.gz (default: third_party/)")
    parser.add_argument("--arch", help=f"CUDA architecture, e.g. 90 (default: ${ARCH_ENV}, else GPU 0's)")
    parser.add_argument("--build-dir", help="where objects and the module go (default: build/selective_scan_cuda/)")
    parser.add_argument("--max-jobs", type=int, help="parallel compile jobs (default: $MAX_JOBS, else all CPUs)")
    parser.add_argument("--install", action="store_true", help="copy the module into site-packages afterwards")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    args = parser.parse_args(argv)
    try:
        info = build_kernel(args.sdist, args.arch, args.build_dir, args.max_jobs, args.verbose)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.install:
        info["installed"] = install_module(info["module"])
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Companion of bench/gpu_check.sh: run it on a machine WITH a package index (this one), before the
# GPU run.  It downloads into .whl/ at the repository root (ignored by git, carried to the GPU
# machine with the checkout) every wheel the GPU check installs that the GPU machine's image does
# not already hold, for CPython 3.12 on manylinux x86_64:
#
#   required   the project's and its peers' packages that the image lacks: performer-pytorch
#              1.1.4 and its dependencies (local-attention, hyper-connections, torch-einops-utils,
#              axial-positional-embedding), flash-linear-attention + fla-core (module `fla`, the
#              chunk linear attention peer; its `transformers` requirement is on the image);
#   fallback   test tools the image holds today (pytest, pytest-benchmark, hypothesis, pytest-xdist,
#              pytest-timeout, numpy, einops, tqdm, setuptools, wheel and their dependencies),
#              carried in case an image lacks them: pip installs a wheel from .whl/ only for a
#              requirement that is not already satisfied, so these never replace the image's.
#
# torch, triton and nvidia-* are never downloaded: the ones of the image (a CUDA build) are used.
# Everything is fetched with --no-deps or with pinned, torch-free resolution, then a closure check
# verifies that every non-optional requirement of every wheel is either in .whl/ or on the image.
# matplotlib is left out on purpose (~25 MiB with pillow, fonttools, kiwisolver): nothing the GPU
# check runs imports it (only tests/test_cli.py's plot test does), and the image holds it anyway.
#
#   bash bench/download_wheels.sh            # required + fallback (~20 MiB, numpy is most of it)
#   bash bench/download_wheels.sh --lean     # required only (~2 MiB)
#
# PYTHON (default python3) runs pip.  The folder is emptied first; the size is printed at the end
# and checked against 60 MiB (the device tool carries at most 64 MiB of ignored paths, with the
# checkout itself).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.whl"
PY="${PYTHON:-python3}"
LEAN=0
for arg in "$@"; do
  case "$arg" in
    --lean) LEAN=1 ;;
    -h|--help) sed -n '2,30p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

# torch-dependent packages: pinned and fetched without dependencies (their `torch` requirement
# would otherwise pull a CPU or CUDA torch of several GiB); versions tested with this project
REQUIRED=(
  performer-pytorch==1.1.4
  local-attention==1.11.2
  hyper-connections==0.4.11
  torch-einops-utils==0.2.0
  axial-positional-embedding==0.3.12
  flash-linear-attention==0.6.0
  fla-core==0.6.0
)
# torch-free test tools: resolved with their dependencies for the target interpreter
FALLBACK=(
  "pytest>=8" "pytest-benchmark>=4" "hypothesis>=6" pytest-xdist pytest-timeout
  numpy "einops>=0.7" "tqdm>=4.60" "setuptools>=68" wheel
)

TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for n in 17 24 27 28 31 34 35 36 38 39; do TARGET+=(--platform "manylinux_2_${n}_x86_64"); done

rm -rf "$DEST"
mkdir -p "$DEST"
echo "downloading into $DEST"
# pip's complaints about find-links folders of a local pip.conf that do not exist are noise here
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet "$PY" -m pip download -q --disable-pip-version-check --no-deps "${TARGET[@]}" -d "$DEST" "${REQUIRED[@]}"
if [ "$LEAN" = 0 ]; then
  quiet "$PY" -m pip download -q --disable-pip-version-check "${TARGET[@]}" -d "$DEST" "${FALLBACK[@]}"
fi

# Closure check: every requirement (markers evaluated for Linux CPython 3.12, extras ignored) of
# every wheel here is met by a wheel here, by the image, or is torch / triton / nvidia-*.
"$PY" - "$DEST" "$LEAN" <<'EOF'
import re, sys, zipfile
from pathlib import Path

dest, lean = Path(sys.argv[1]), sys.argv[2] == "1"
# Python packages of the GPU machine's image ('cuda'), as ../.library/device/KINDS.md lists them
# (read on 2026-11-17); only the names that the check's wheels may require are kept here.
IMAGE = {
    "einops", "tqdm", "pytest", "pytest-benchmark", "pytest-xdist", "pytest-timeout", "hypothesis",
    "numpy", "matplotlib", "setuptools", "wheel", "transformers", "packaging", "pluggy", "iniconfig",
    "pygments", "py-cpuinfo", "sortedcontainers", "attrs", "execnet", "filelock", "typing-extensions",
    "huggingface-hub", "safetensors", "tokenizers", "regex", "pyyaml", "requests", "fsspec",
    "colorama", "exceptiongroup", "tomli",
}
ALWAYS = re.compile(r"^(torch|triton|nvidia-.*)$")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
try:
    from packaging.markers import Marker
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.markers import Marker

wheels = sorted(dest.glob("*.whl"))
have = {}
for w in wheels:
    name = norm(w.name.split("-")[0])
    if name in have:
        sys.exit(f"two versions of {name} in {dest}: {have[name].name}, {w.name}")
    have[name] = w
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        spec = line.split(":", 1)[1].strip()
        req, _, marker = spec.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate(env):
            continue  # an extra, or another platform / Python
        name = norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))
        if name in have or ALWAYS.match(name) or (name in IMAGE):
            continue
        missing.append(f"{w.name}: {spec}")
for name in ("performer-pytorch", "local-attention", "axial-positional-embedding", "fla-core",
             "flash-linear-attention") + (() if lean else ("pytest", "pytest-benchmark", "numpy")):
    if name not in have:
        missing.append(f"(no wheel of {name})")
if missing:
    print("requirements met by neither .whl/ nor the image:\n  " + "\n  ".join(missing))
    sys.exit(1)
print(f"closure ok: {len(wheels)} wheels; every requirement is here, on the image, or torch/triton/nvidia-*")
EOF

ls -1 "$DEST"
BYTES=$(du -sb "$DEST" | cut -f1)
echo "total: $((BYTES / 1024)) KiB in $(ls "$DEST" | wc -l) wheels"
if [ "$BYTES" -gt $((60 * 1024 * 1024)) ]; then
  echo "over 60 MiB: the device tool carries at most 64 MiB with the checkout; use --lean" >&2
  exit 1
fi

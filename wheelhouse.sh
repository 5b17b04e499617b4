#!/usr/bin/env bash
# A folder of wheels for an offline notebook whose image already has torch: every package requirements-notebook.txt
# installs, for the image's Python on x86-64 Linux, resolved around the image's own pins and without them (the image
# keeps its torch, numpy and triton). Run it where there is internet; no package is installed here.
#
#     bash wheelhouse.sh wheels                                  # Kaggle's image: Python 3.12, torch 2.10.0, numpy 2.0.2, triton 3.6.0
#     bash wheelhouse.sh wheels 3.11 torch==2.13.0 numpy==2.0.2  # another image: its Python, then its own pins
#
# Then, in the notebook, with no network (wheels/image.txt holds the pins the folder was resolved around):
#
#     pip install --no-index --find-links wheels -r requirements-notebook.txt -c wheels/image.txt
set -euo pipefail

out="${1:?usage: bash wheelhouse.sh FOLDER [PYTHON_VERSION [IMAGE_PIN ...]]}"
python_version="${2:-3.12}"
shift $(($# < 2 ? $# : 2))
pins=("$@")
[ ${#pins[@]} -gt 0 ] || pins=(torch==2.10.0 numpy==2.0.2 triton==3.6.0)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"

# the image's glibc may be older than this machine's: manylinux wheels up to glibc 2.35 (Ubuntu 22.04, Kaggle's)
target=(--only-binary=:all: --implementation cp --python-version "$python_version" --platform manylinux2014_x86_64)
for minor in $(seq 17 35); do target+=(--platform "manylinux_2_${minor}_x86_64"); done

mkdir -p "$out"
printf '%s\n' "${pins[@]}" >"$out/image.txt"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# pip download would fetch the image's torch too (every package here requires it): resolve first, then download
# everything the resolution installs but the image's own pins and torch's CUDA libraries (nvidia-*, cuda-*: the
# image has them with its torch), each without its dependencies
"$python" -m pip install --dry-run --ignore-installed --quiet --report "$scratch/report.json" --target "$scratch/t" \
    "${target[@]}" -r "$here/requirements-notebook.txt" -c "$out/image.txt"
"$python" - "$scratch/report.json" "$out/image.txt" >"$scratch/wheels.txt" <<'EOF'
import json, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
kept = {norm(re.split(r"[=<>!~ ;]", line)[0]) for line in open(sys.argv[2]) if line.strip()}
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    name = norm(meta["name"])
    if name not in kept and not name.startswith(("nvidia-", "cuda-")):
        print(f"{meta['name']}=={meta['version']}")
EOF
"$python" -m pip download --quiet --no-deps "${target[@]}" -d "$out" -r "$scratch/wheels.txt"
echo "$out: $(ls "$out"/*.whl | wc -l) wheels for Python $python_version beside ${pins[*]}"

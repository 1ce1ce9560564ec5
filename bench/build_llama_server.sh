#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` as a peer for bench/suffix.py: its n-gram speculative
# decoding (--spec-type ngram-*) is what a copy-based draft has to beat. The llama.cpp source
# is the one vendored in the llama-cpp-python sdist of the installed version, so the server and
# the Python bindings run the same kernels on the same GGUF.
#   bash bench/build_llama_server.sh            # ~10-20 min on 2 cores
# Environment: PYTHON (default .venv/bin/python), LLAMA_CPP_PYTHON_VERSION (default: installed,
# else constraints.txt), JOBS (default 2), DEST (default ~/.cache/dovetail/llama-server).
# Prints the installed binary's path on its last line.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
DEST="${DEST:-$HOME/.cache/dovetail/llama-server}"
JOBS="${JOBS:-2}"

pick_version() {
    # The installed bindings first (the server should match them), then the pinned version.
    local v
    v="$("$PY" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)"
    if [ -z "$v" ]; then
        v="$(sed -n 's/^llama[-_]cpp[-_]python==\([0-9.]*\).*/\1/p' "$REPO/constraints.txt" | head -1)"
    fi
    echo "$v"
}

ensure_tools() {
    # cmake and ninja from Debian when missing; apt-get update only when something is.
    local missing=()
    command -v cmake >/dev/null || missing+=(cmake)
    command -v ninja >/dev/null || missing+=(ninja-build)
    command -v g++ >/dev/null || missing+=(g++)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt-get update
        apt-get install -y "${missing[@]}"
    fi
}

VERSION="${LLAMA_CPP_PYTHON_VERSION:-$(pick_version)}"
[ -n "$VERSION" ] || { echo "cannot tell which llama-cpp-python version to build" >&2; exit 1; }
ensure_tools

WORK="$(mktemp -d /tmp/llama-server-build.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
echo "llama-cpp-python $VERSION: downloading its sdist into $WORK"
"$PY" -m pip download --no-deps --no-binary :all: -d "$WORK" "llama-cpp-python==$VERSION"
first_existing() {
    # The first of its arguments (expanded globs) that exists: sdists spell the name either way.
    local p
    for p in "$@"; do [ -e "$p" ] && { echo "$p"; return 0; }; done
    return 1
}
SDIST="$(first_existing "$WORK"/llama_cpp_python-*.tar.gz "$WORK"/llama-cpp-python-*.tar.gz)" \
    || { echo "no sdist downloaded into $WORK" >&2; exit 1; }
tar -xzf "$SDIST" -C "$WORK"
SRC="$(first_existing "$WORK"/llama_cpp_python-*/vendor/llama.cpp "$WORK"/llama-cpp-python-*/vendor/llama.cpp)" \
    || { echo "no vendor/llama.cpp in $SDIST" >&2; exit 1; }

GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S "$SRC" -B "$WORK/build" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON
cmake --build "$WORK/build" --target llama-server -j "$JOBS"

BIN="$(find "$WORK/build" -type f -name llama-server -perm -u+x | head -1)"
[ -n "$BIN" ] || { echo "llama-server was not built" >&2; exit 1; }
mkdir -p "$DEST"
install -m 755 "$BIN" "$DEST/llama-server"
echo "$VERSION" > "$DEST/VERSION"
# Keep the flag reference next to the binary: bench/suffix.py reads which --spec-type values exist.
cp "$SRC/common/arg.cpp" "$DEST/arg.cpp" 2>/dev/null || true
"$DEST/llama-server" --version 2>&1 | tail -2 || true
echo "$DEST/llama-server"

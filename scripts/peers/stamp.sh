# Sourced by install_comfyui.sh and install_facefusion.sh: the stamp that makes a second
# install with the same source and recipe a no-op.

# peer_source_id SOURCE REF: what the stamp records of the source (a tarball by its
# digest, a git URL by URL and ref).
peer_source_id() {
  if [ -f "$1" ]; then
    echo "tarball:$(sha256sum "$1" | cut -d' ' -f1)"
  else
    echo "git:$1@$2"
  fi
}

# peer_installed STAMP WANT VENV ENTRY_FILE: the stamp says WANT and the install is whole.
peer_installed() {
  [ -f "$1" ] && [ "$(cat "$1")" = "$2" ] && [ -x "$3/bin/python" ] && [ -f "$4" ]
}

"""ComfySwap: the command line and the local dev server."""

"""The GPU runner: an HTTP server, a pipelined worker and the engines it drives."""

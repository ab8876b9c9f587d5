"""The real ComfyUI (installed by ``make peers`` into ``.tools/``) as a loopback server.

One launcher for the real-peer tier, the benchmarks and anyone else who wants the real
program: ``start_real_comfyui(base_dir)`` starts ``main.py --cpu`` on 127.0.0.1 with every
folder it writes (input, output, temp, user, models) under ``base_dir``, so several runs
share one installation without touching it. ComfyUI answers ``/system_stats`` 12-40 s
after start on two cores (docs/comfyui-protocol.md, "Real peer").
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

from tests.servers import ServerProcess, free_port, start_server

__all__ = [
    "CHECKPOINT_NAMES",
    "COMFYUI_DIR",
    "COMFYUI_PYTHON",
    "comfyui_command",
    "installed",
    "missing_reason",
    "start_real_comfyui",
]

REPO = Path(__file__).resolve().parents[2]
TOOLS = Path(os.environ.get("COMFYUI_TOOLS_DIR", REPO / ".tools"))
COMFYUI_DIR = TOOLS / "comfyui" / "ComfyUI"
COMFYUI_PYTHON = TOOLS / "comfyui-venv" / "bin" / "python"
STAMP = TOOLS / "comfyui" / ".installed"
READY_TIMEOUT_S = 180.0  # 12-40 s on a quiet 2-core machine; a shared one is slower

# Empty files under models/checkpoints let a checkpoint graph pass /prompt validation; it
# then fails at load ("header too small"): how templates are validated without weights.
CHECKPOINT_NAMES = ("v1-5-pruned-emaonly.safetensors",)


def installed() -> bool:
    return STAMP.is_file() and COMFYUI_PYTHON.is_file() and (COMFYUI_DIR / "main.py").is_file()


def missing_reason() -> str:
    return f"the real ComfyUI is not installed in {TOOLS} (run `make peers`)"


def comfyui_command(base_dir: Path, port: int) -> list[str]:
    """The command line that serves the real ComfyUI on 127.0.0.1:``port`` from ``base_dir``."""
    return [
        str(COMFYUI_PYTHON),
        str(COMFYUI_DIR / "main.py"),
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-auto-launch",
        "--base-directory",
        str(base_dir),
        "--database-url",
        "sqlite:///:memory:",
    ]


def prepare_base_dir(base_dir: Path) -> Path:
    for folder in ("input", "output", "temp", "user", "custom_nodes"):
        (base_dir / folder).mkdir(parents=True, exist_ok=True)
    # SaveImageWebsocket ships as an example custom node (as the protocol recording used it).
    example = COMFYUI_DIR / "custom_nodes" / "websocket_image_save.py"
    if example.is_file():
        shutil.copyfile(example, base_dir / "custom_nodes" / example.name)
    checkpoints = base_dir / "models" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_NAMES:
        (checkpoints / name).touch()
    return base_dir


def comfyui_command_line(base_dir: Path, port: int) -> str:
    """``comfyui_command`` as a COMFYUI_COMMAND value (the runner's supervisor splits it)."""
    prepare_base_dir(base_dir)
    return shlex.join(comfyui_command(base_dir, port))


def start_real_comfyui(base_dir: Path, *, port: int = 0, log_dir: Path | None = None) -> ServerProcess:
    """Start the real ComfyUI and wait (bounded) until ``/system_stats`` answers."""
    if not installed():
        raise RuntimeError(missing_reason())
    port = port or free_port()
    prepare_base_dir(base_dir)
    return start_server(
        "comfyui-real",
        comfyui_command(base_dir, port),
        url=f"http://127.0.0.1:{port}",
        log_dir=log_dir or base_dir,
        health_path="/system_stats",
        timeout_s=READY_TIMEOUT_S,
        cwd=COMFYUI_DIR,
    )

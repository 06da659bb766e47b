"""Docker HEALTHCHECK for the one ODLA image: asks /health of whichever role PID 1 runs."""

import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from odla.config import load_settings  # noqa: E402


def main() -> int:
    settings = load_settings()
    cmdline = Path("/proc/1/cmdline").read_bytes() if Path("/proc/1/cmdline").exists() else b""
    port = settings.node_port if b"node.py" in cmdline else settings.operator_port
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except OSError:
        return 1


if __name__ == "__main__":
    sys.exit(main())

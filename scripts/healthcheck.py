"""Docker HEALTHCHECK for the one ODLA image: asks /health of whichever role PID 1 runs; a node
with ``link: dial`` listens on no port, so its link's mark (``odla.node.dial.link_mark``) is read instead."""

import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from odla.core.config import load_settings  # noqa: E402
from odla.node.dial import link_mark  # noqa: E402


def main() -> int:
    settings = load_settings()
    cmdline = Path("/proc/1/cmdline").read_bytes() if Path("/proc/1/cmdline").exists() else b""
    port = settings.node_port if b"node.py" in cmdline else settings.operator_port
    if b"node.py" in cmdline and settings.link == "dial":  # linked and healthy at its last status
        mark = link_mark()
        return 0 if mark.exists() and time.time() - mark.stat().st_mtime < 3 * settings.heartbeat_interval else 1
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except OSError:
        return 1


if __name__ == "__main__":
    sys.exit(main())

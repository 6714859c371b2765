"""A simulated Windows or macOS: what that platform lacks, removed before udp_timecheck is imported.

    UDP_TIMECHECK_SIMULATE=windows python -m pytest     # or macos; unset: this machine as it is

conftest.py applies it in the test process, and cli() runs the program through this file
(`python tests/simulate.py udp_timecheck.py ARGS...`) so that every subprocess sees the
same platform; unset, the program runs as this machine has it, imported as a module (so
from its cached bytecode) with the same argv and the same main().  What it removes, as the
issue that asked for it measured them:

- Windows: socket.recvmsg and sendmsg (so no ancillary data: no kernel timestamps, no
  packet info), time.clock_gettime, signal.SIGHUP; sys.platform is "win32" while the
  module is imported, so it takes Windows' SO_RCVTIMEO (a DWORD), and no clock state.
- macOS: sys.platform is "darwin" while the module is imported: no SO_TIMESTAMPNS, no
  IP_PKTINFO, no SO_TIMESTAMPING; SO_TIMESTAMP's macOS number, which this kernel refuses,
  so receive stamps fall back to user space; the clock state from ntp_adjtime.

Only the module's view of the platform changes: sockets still go through this machine's
kernel, on loopback.
"""

import ast
import importlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

MODULE = Path(__file__).resolve().parent.parent / "udp_timecheck.py"
SIMULATED = os.environ.get("UDP_TIMECHECK_SIMULATE", "")
PLATFORMS = {"windows": "win32", "macos": "darwin"}


class _WindowsSocket(socket.socket):
    """A socket as Windows' Python has it: no recvmsg, no sendmsg."""

    @property
    def recvmsg(self):
        raise AttributeError("'socket' object has no attribute 'recvmsg' (simulated Windows)")

    @property
    def sendmsg(self):
        raise AttributeError("'socket' object has no attribute 'sendmsg' (simulated Windows)")

    @property
    def recvmsg_into(self):
        raise AttributeError("'socket' object has no attribute 'recvmsg_into' (simulated Windows)")


def _remove(module, *names):
    for name in names:
        if hasattr(module, name):
            delattr(module, name)


def _import_dependencies():
    """The module's own imports, imported first, while the platform is still this one."""
    tree = ast.parse(MODULE.read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            importlib.import_module(node.module)


def apply():
    """Simulate the platform UDP_TIMECHECK_SIMULATE names, and import udp_timecheck under it."""
    if not SIMULATED:
        return
    if SIMULATED not in PLATFORMS:
        raise SystemExit("UDP_TIMECHECK_SIMULATE={!r}: expected one of {}".format(
            SIMULATED, sorted(PLATFORMS)))
    _import_dependencies()
    if SIMULATED == "windows":
        socket.socket = _WindowsSocket
        _remove(time, "clock_gettime", "clock_gettime_ns", "clock_settime", "clock_settime_ns")
        _remove(signal, "SIGHUP")
    _remove(socket, "IP_PKTINFO", "SO_TIMESTAMPNS", "SO_TIMESTAMPING", "MSG_ERRQUEUE")
    real, sys.platform = sys.platform, PLATFORMS[SIMULATED]
    try:
        sys.path.insert(0, str(MODULE.parent))
        import udp_timecheck  # noqa: F401 - now cached, as the simulated platform shows it
    finally:
        sys.platform = real


if __name__ == "__main__":  # python simulate.py udp_timecheck.py ARGS...: the program, simulated
    apply()
    sys.path.insert(0, str(MODULE.parent))
    import udp_timecheck
    sys.argv = sys.argv[1:]
    sys.exit(udp_timecheck.main())

"""The remote end of a rank started through a remote shell: ``python -m mlxdist.launch.remote``.

Usage (what :func:`mlxdist.launch.hosts.remote_command` writes)::

    python -m mlxdist.launch.remote [--hostfile JSON] -- COMMAND...

It writes the ring hostfile's content to a file of its own (MLX reads
``MLX_HOSTFILE`` as a path), starts ``COMMAND`` as its child with
``MLX_HOSTFILE`` naming it, and waits. When its standard input reaches its
end (the launcher closed the pipe, or the local shell that carried it
ended: a remote shell does not end remote processes by itself), or on
SIGTERM, SIGHUP or SIGINT, it ends the child: SIGTERM (and SIGCONT), then SIGKILL after
:data:`GRACE` seconds. It exits as the child did (killed by a signal: by
the same signal), and removes the file.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any, Optional, Sequence

__all__ = ["main", "GRACE"]

GRACE = 3.0
_USAGE = "usage: python -m mlxdist.launch.remote [--hostfile JSON] -- COMMAND..."


def _parse(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
    args = list(argv)
    hostfile = None
    if args[:1] == ["--hostfile"] and len(args) >= 2:
        hostfile, args = args[1], args[2:]
    if args[:1] != ["--"] or len(args) < 2:
        raise SystemExit(f"mlxdist.launch.remote: {_USAGE}")
    return hostfile, args[1:]


class _Child:
    """The rank, and ending it once (from whichever thread asks first)."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
        self._lock = threading.Lock()
        self._ending = False

    def end(self) -> None:
        """End the child, once: SIGTERM (and SIGCONT), SIGKILL after :data:`GRACE` s, on a thread of its own."""
        with self._lock:
            if self._ending:
                return
            self._ending = True
        threading.Thread(target=self._end, daemon=True).start()

    def _end(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            os.kill(self.proc.pid, signal.SIGCONT)  # a stopped rank takes the SIGTERM
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(GRACE)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _watch_stdin(child: _Child) -> None:
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    child.end()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the rank until it ends or is ended (see the module docstring).

    Args:
        argv: ``[--hostfile JSON] -- COMMAND...`` (default: ``sys.argv[1:]``).

    Returns:
        The child's exit status (after a signal, this process ends by it instead);
        127 when the command could not be started.

    Raises:
        SystemExit: a bad command line.
    """
    hostfile, command = _parse(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    directory = tempfile.mkdtemp(prefix="mlxdist-remote-")
    try:
        if hostfile is not None:
            path = os.path.join(directory, "hosts.json")
            with open(path, "w") as f:
                f.write(hostfile)
            env["MLX_HOSTFILE"] = path
        asked: list[int] = []  # a signal that arrives before the child exists ends it at once

        def ending(signum: int, frame: Any) -> None:
            asked.append(signum)
            if started:
                started[0].end()

        started: list[_Child] = []
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, ending)
        try:
            started.append(_Child(command, env))
        except OSError as exc:
            print(f"mlxdist.launch.remote: cannot start {command[0]!r}: {exc}", file=sys.stderr, flush=True)
            return 127
        child = started[0]
        if asked:
            child.end()
        threading.Thread(target=_watch_stdin, args=(child,), daemon=True).start()
        code = child.proc.wait()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Ctrl+C on the command line, as a user presses it: run a command with stderr on a pseudo-terminal (so its
progress bar shows the stage), wait until a marker appears there, send SIGINT (or SIGTERM, SIGKILL: what a
scheduler or a crash sends), and collect the rest."""
import os
import select
import signal
import subprocess
import time


def interrupt_when(command, marker: bytes, timeout: float = 60, sig=signal.SIGINT, delay: float = 0.0):
    """(exit code, everything written to stderr) of `command` sent `sig` (Ctrl+C's SIGINT unless told)
    `delay` seconds after `marker` was printed."""
    import pty
    master, slave = pty.openpty()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < deadline and process.poll() is None:
            seen += _read(master, 0.5)
        assert marker in seen, f"{marker!r} never appeared: {seen!r}"
        time.sleep(delay)
        process.send_signal(sig)
        code = process.wait(timeout=60)
        while True:  # the rest of stderr
            chunk = _read(master, 0.2)
            if not chunk:
                break
            seen += chunk
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    return code, seen.decode(errors="replace")


def _read(fd, wait: float) -> bytes:
    """What the terminal has within `wait` seconds; b"" when nothing (or it closed)."""
    if not select.select([fd], [], [], wait)[0]:
        return b""
    try:
        return os.read(fd, 4096)
    except OSError:
        return b""

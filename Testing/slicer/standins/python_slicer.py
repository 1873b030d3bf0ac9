"""`PythonSlicer` as Slicer ships it: a CTKAppLauncher (commontk/AppLauncher, Base/ctkAppLauncher.cpp) that
starts the real interpreter (`python-real`) as its own child and waits for it. What the module meets through
it, and what this stand-in does the same way:

- the child is a new process (QProcess::start, not exec): the worker's pid is not the launcher's;
- stdin, stdout and stderr are the child's own, inherited (ForwardedChannels, ForwardedInputChannel);
- no signal is forwarded: killing the launcher leaves the child running, re-parented to init;
- the launcher exits with the child's exit code, except that a child killed by a signal (QProcess::CrashExit)
  becomes exit code 1 (EXIT_FAILURE) after "error: [<program>] exit abnormally - Report the problem." on stderr.

    PythonSlicer ARGS...   (slicer_app.install_launcher puts a `PythonSlicer` running this on PATH)

The real interpreter is $SEGMENTMBTFE_TEST_PYTHON_REAL (to run the worker under another Python, e.g. a venv
with an older torch), else the Python running this launcher.
"""
import os
import signal
import subprocess
import sys

PYTHON_REAL = "SEGMENTMBTFE_TEST_PYTHON_REAL"


def main(arguments) -> int:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl+C ends a C++ launcher at once; Python would raise instead
    program = os.environ.get(PYTHON_REAL) or sys.executable
    code = subprocess.call([program] + list(arguments))  # stdio inherited; waits, forwarding nothing
    if code < 0:  # killed by a signal: ctkAppLauncherPrivate::applicationFinished's CrashExit branch
        print(f"error: [{program}] exit abnormally - Report the problem.", file=sys.stderr, flush=True)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

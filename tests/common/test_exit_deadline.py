"""A shutdown that hangs after the server stopped ends within the exit deadline, with every
thread's stack on stderr (voxserve_common/service.py ExitDeadline; issue 9's podman stop that
once hung after "whisper model closed")."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

HANGS = textwrap.dedent(
    """
    import threading
    from voxserve_common.service import ExitDeadline

    def stuck_in_teardown():
        threading.Event().wait()  # a non-daemon thread the interpreter waits for at exit

    ExitDeadline("test-service", {seconds}).arm()
    threading.Thread(target=stuck_in_teardown).start()
    """
)


def run(seconds: float) -> subprocess.CompletedProcess[str]:
    script = HANGS.format(seconds=seconds)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_hung_shutdown_exits_1_after_the_deadline_with_every_threads_stack() -> None:
    done = run(0.5)
    assert done.returncode == 1, done.stderr
    first = json.loads(done.stderr.splitlines()[0])
    assert first["level"] == "CRITICAL" and first["service"] == "test-service"
    assert first["message"].startswith("shutdown did not finish within 0.5 s after the server stopped")
    assert "stuck_in_teardown" in done.stderr


def test_a_shutdown_that_finishes_is_not_held_by_the_deadline() -> None:
    script = "from voxserve_common.service import ExitDeadline\nExitDeadline('test-service', 60).arm()\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stderr == ""


HANGS_IN_FINALIZATION = textwrap.dedent(
    """
    import atexit, sys, threading
    from voxserve_common.service import exit_without_finalizing

    atexit.register(threading.Event().wait)  # stands for a native destructor that never returns
    print("written before the exit", end="")  # still in stdout's buffer (a pipe)
    sys.stderr.write("and on stderr")
    exit_without_finalizing({status})
    """
)


def test_the_exit_after_a_clean_stop_skips_finalization_and_loses_no_output() -> None:
    # The podman test's inference container once hung past faulthandler's uninstall (no
    # stack, no exit deadline) after "whisper model closed": the services now end with
    # os._exit once their own things are closed and flushed. Without it this script hangs.
    script = HANGS_IN_FINALIZATION.format(status=3)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stdout == "written before the exit"
    assert done.stderr == "and on stderr"

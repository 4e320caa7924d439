"""The package's examples run as a user runs them: with only the current
context of `agentctl dev`'s config file to go by."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import agentplane

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_spawn_follow_stop_runs_against_the_stack(stack):
    env = dict(os.environ)
    env["XDG_CONFIG_HOME"] = str(stack.config_home)
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "spawn_follow_stop.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("spawned example-follow ("), out.stdout
    assert "step 3" in lines and "ready" in lines, out.stdout
    assert lines[-1] == "stopped: AGENT_STATE_EXITED", out.stdout


def test_logs_and_watch_are_iterators(stack):
    with agentplane.Client(stack.endpoint, ca=stack.ca, token_file=stack.token_file) as c:
        events = c.watch()
        a = c.spawn("sh", ["-c", "echo one; echo two"], name="py-iter")
        # The agent's end arrives as an event; if none comes in 30 s the
        # channel is closed under the iterator, which then fails the test.
        guard = threading.Timer(30, c.close)
        guard.start()
        try:
            for e in events:
                if e.agent_id == a.id and e.state == agentplane.types.AGENT_STATE_EXITED:
                    break
        finally:
            guard.cancel()
        assert b"".join(c.logs("py-iter")) == b"one\ntwo\n"
        c.rm("py-iter")

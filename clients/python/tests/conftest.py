"""A real stack for the tests: `agentctl dev` on free loopback ports, with
its own CA, certificates and admin token, found through the context `dev` it
writes under $XDG_CONFIG_HOME.

The binary comes from $AGENTPLANE_BIN_DIR (default: <repo>/target/debug);
redis-server must be on PATH (scripts/test installs it).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[3]
#: How long `agentctl dev` may take to start Redis, both servers, and see
#: its host agent registered (it gives the host agent 20 s itself).
START_LIMIT = 60.0
#: How long it may take to stop its agents, its servers and Redis.
STOP_LIMIT = 30.0


@dataclasses.dataclass(frozen=True)
class Stack:
    endpoint: str
    ca: Path
    token_file: Path
    log: Path
    #: Its XDG_CONFIG_HOME, where context `dev` is current.
    config_home: Path = Path()

    @property
    def token(self) -> str:
        return self.token_file.read_text().splitlines()[0].strip()

    @property
    def address(self) -> str:
        """host:port of the control plane."""
        return self.endpoint.removeprefix("https://")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"


def _log_tail(log: Path, lines: int = 40) -> str:
    return Stack("", Path(), Path(), log).log_tail(lines)


def _read_context(path: Path) -> dict | None:
    """Context `dev` of the config file once it is whole (it may be read
    mid-write), as endpoint, ca and token_file."""
    try:
        cfg = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    dev = cfg.get("contexts", {}).get("dev", {})
    ctx = {
        "endpoint": (dev.get("endpoints") or [None])[0],
        "ca": dev.get("ca"),
        "token_file": dev.get("token-file"),
    }
    if cfg.get("current-context") == "dev" and all(isinstance(v, str) and v for v in ctx.values()):
        return ctx
    return None


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM and a bounded wait; SIGKILL if it does not stop in time."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=STOP_LIMIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    bin_dir = Path(os.environ.get("AGENTPLANE_BIN_DIR", REPO / "target" / "debug"))
    agentctl = bin_dir / "agentctl"
    if not os.access(agentctl, os.X_OK):
        pytest.fail(f"{agentctl} is missing: build it (cargo build --bins) or set AGENTPLANE_BIN_DIR")
    base = tmp_path_factory.mktemp("stack")
    config = base / "config"
    data = base / "data"
    log = base / "agentctl-dev.log"
    # AGENTPLANE_* of the caller's shell are for its own stack, not this one.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPLANE_")}
    env["XDG_CONFIG_HOME"] = str(config)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(agentctl),
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--host-listen",
                "127.0.0.1:0",
                "--data-dir",
                str(data),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    context_file = config / "agentplane" / "config.toml"
    try:
        deadline = time.monotonic() + START_LIMIT
        while (ctx := _read_context(context_file)) is None:
            if proc.poll() is not None:
                pytest.fail(f"agentctl dev exited ({proc.returncode}) before writing {context_file}:\n{_log_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"agentctl dev wrote no {context_file} within {START_LIMIT} s:\n{_log_tail(log)}")
            time.sleep(0.1)
        s = Stack(
            endpoint=ctx["endpoint"],
            ca=Path(ctx["ca"]),
            token_file=Path(ctx["token_file"]),
            log=log,
            config_home=config,
        )
        assert s.endpoint.startswith("https://127.0.0.1:"), s.endpoint
        yield s
    finally:
        rc = _stop(proc)
    assert rc == 0, f"agentctl dev exited {rc} after SIGTERM:\n{_log_tail(log)}"
    left = tomllib.loads(context_file.read_text()) if context_file.exists() else {}
    assert "dev" not in left.get("contexts", {}), f"agentctl dev left its context behind: {left}"

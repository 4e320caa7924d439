"""Spawn an agent, follow its output until it says it is ready, stop it.

Runs against the current agentctl context (start `scripts/dev` or
`agentctl dev` first):

    python examples/spawn_follow_stop.py
"""

import sys

import agentplane


def main() -> int:
    with agentplane.Client.from_context() as c:
        a = c.spawn(
            "sh",
            ["-c", "for i in 1 2 3; do echo step $i; sleep 0.2; done; echo ready; exec sleep 1000"],
            name="example-follow",
            labels={"example": "python"},
        )
        print(f"spawned {a.spec.name} ({a.id}) on {a.host}: {agentplane.types.AgentState.Name(a.state)}")
        seen = b""
        # Names work wherever an id does.
        for chunk in c.logs("example-follow", follow=True):
            sys.stdout.write(chunk.decode(errors="replace"))
            seen += chunk
            if b"ready\n" in seen:
                break
        ended = c.stop("example-follow", grace=2)
        print(f"stopped: {agentplane.types.AgentState.Name(ended.state)}")
        c.rm("example-follow")
    return 0


if __name__ == "__main__":
    sys.exit(main())

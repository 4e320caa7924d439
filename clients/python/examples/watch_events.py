"""Print agent and host events as they happen (Ctrl-C to stop), against the
current agentctl context:

    python examples/watch_events.py
"""

import agentplane


def main() -> None:
    with agentplane.Client.from_context() as c:
        for e in c.watch():
            kind = agentplane.types.EventType.Name(e.type)
            state = agentplane.types.AgentState.Name(e.state)
            print(f"{kind:28} {e.agent_id or '-':28} {state:22} {e.host}", flush=True)


if __name__ == "__main__":
    main()

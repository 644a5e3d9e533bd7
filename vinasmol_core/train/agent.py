"""`python -m vinasmol_core.train.agent TORCHRUN_ARGS`: the torchrun agent of one pod of a JobSet.

It is torchrun itself, run in this process (so it stays the pod's PID 1), with the rendezvous host
named explicitly: `--rdzv-conf=is_host=1` on node 0 ($NODE_RANK, the pod's completion index), 0 on
the others. Left to itself, torchrun makes a node the host only when the rendezvous endpoint's DNS
name resolves to one of its addresses when the agent starts, which a freshly created pod's own
name may not yet do; the local group (`group.agent_command`) names the host the same way.
"""

from __future__ import annotations

import os
import sys

from vinasmol_core.common.errors import ConfigError


def torchrun_args(argv: list[str], node_rank: str | None) -> list[str]:
    """`argv` with `--rdzv-conf=is_host=...` for this node in front (unless it names a rendezvous
    configuration itself)."""
    if any(a.startswith(("--rdzv-conf", "--rdzv_conf")) for a in argv):
        return list(argv)
    if node_rank is None or not node_rank.strip().isdigit():
        raise ConfigError(f"NODE_RANK must be this pod's index (0, 1, ...), got {node_rank!r}")
    return [f"--rdzv-conf=is_host={1 if int(node_rank) == 0 else 0}", *argv]


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.run import main as torchrun

    args = torchrun_args(sys.argv[1:] if argv is None else argv, os.environ.get("NODE_RANK"))
    torchrun(args)


if __name__ == "__main__":
    main()

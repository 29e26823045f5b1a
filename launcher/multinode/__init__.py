"""Multi-node training: one job over several machines through PyTorch's own engine (torchrun's c10d
rendezvous on the first node; NCCL on GPUs, gloo on CPUs). gpu-run starts it on every node, follows
rank 0, stops every machine and adds up their cost; it does not reinvent the distributed part.

    start.py     `gpu-run train --host a,b`: the nodes set up in parallel, torchrun on each
    finish.py    follow rank 0, stop the others when one fails, pull, stop every machine, record
    commands.py  attach, stop, pull, status and logs of a multi-node run
    network.py   the interface that reaches the first node, the rendezvous port (doctor and train)
    nodes.py     each node's record in the ledger, the summed cost, steps on every node at once
"""

from __future__ import annotations

from gpu_run.multinode.nodes import is_multinode

__all__ = ["is_multinode"]

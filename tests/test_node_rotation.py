"""NodeRotation (policy.py): which node of a clustered broker the daemon tries next (mqtt.hosts)."""

from __future__ import annotations

import random

import pytest

from waiting_room.policy import NodeRotation


def rotation_trace(count: int, outcomes: str) -> str:
    """Each outcome ("f": the attempt failed, "l": it connected and was lost later) gives the
    node it was on, and "w" after it when the caller waits its backoff before the next."""
    rotation = NodeRotation(count)
    out = []
    for outcome in outcomes:
        node = rotation.current
        wait = rotation.failed() if outcome == "f" else rotation.lost()
        out.append(f"{node}{'w' if wait else ''}")
    return " ".join(out)


ROTATIONS = [
    # one node: today's behaviour, a wait before every attempt
    (1, "fff", "0w 0w 0w"),
    (1, "lfl", "0w 0w 0w"),
    # the first node that answers: node 0 refuses, node 1 is taken at once
    (3, "fl", "0 1w"),
    # a whole round fails: then the backoff, and the same order again
    (3, "ffffff", "0 1 2w 0 1 2w"),
    # lost: the next node first (after the backoff), the lost one last
    (3, "lff", "0w 1 2"),
    (3, "lfff", "0w 1 2 0w"),
    (3, "llll", "0w 1w 2w 0w"),
    # lost on node 1 after a failover from 0: on to 2, then around to 0, then 1
    (3, "flfff", "0 1w 2 0 1w"),
    (2, "lflf", "0w 1 0w 1"),
]


@pytest.mark.parametrize(("count", "outcomes", "trace"), ROTATIONS)
def test_node_rotation(count, outcomes, trace):
    assert rotation_trace(count, outcomes) == trace


def test_node_rotation_needs_a_node():
    with pytest.raises(ValueError):
        NodeRotation(0)


def test_node_rotation_every_round_tries_every_node_once():
    rng = random.Random(14)
    for count in range(1, 6):
        rotation = NodeRotation(count)
        tried: list[int] = []
        for _ in range(500):
            tried.append(rotation.current)
            wait = rotation.lost() if rng.random() < 0.2 else rotation.failed()
            if wait:  # a round ended: it tried each node exactly once, unless a loss cut it short
                assert len(tried) == len(set(tried)) and len(tried) <= count
                tried = []

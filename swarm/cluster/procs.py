"""Stopping process trees: every process swarm starts is a group leader, stopped with its tree."""

from __future__ import annotations

import os
import signal

import psutil


def group_and_tree(leader_pid: int) -> list[psutil.Process]:
    """The leader, its descendants, and any other member of its process group."""
    found: dict[int, psutil.Process] = {}
    try:
        leader = psutil.Process(leader_pid)
        found[leader.pid] = leader
        for child in leader.children(recursive=True):
            found[child.pid] = child
    except psutil.NoSuchProcess:
        pass
    # Orphans re-parented to init are no longer descendants but keep the group id.
    for proc in psutil.process_iter():
        try:
            if proc.pid not in found and os.getpgid(proc.pid) == leader_pid:
                found[proc.pid] = proc
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return list(found.values())


def terminate(procs: list[psutil.Process], grace_s: float) -> int:
    """SIGTERM ``procs``, SIGKILL whatever is left after ``grace_s``; returns how many there were."""
    alive = []
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
            alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    _, left = psutil.wait_procs(alive, timeout=grace_s)
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(left, timeout=5)
    return len(alive)


def stop_group(leader_pid: int, grace_s: float = 8.0) -> int:
    """Stop a process group leader with its whole tree; returns the number of processes stopped.

    SIGTERM goes to the leader, which gets ``grace_s`` to stop its children; whatever is left
    is terminated, then killed. The tree is listed before any signal: once a parent dies, its
    children are re-parented and could no longer be found through it. A last sweep of the
    group catches processes spawned meanwhile.
    """
    tree = group_and_tree(leader_pid)
    # The leader first: `ray start --block` shuts its node down in Ray's own order, which
    # is quicker than every process handling SIGTERM at once while its peers vanish.
    leader = [p for p in tree if p.pid == leader_pid]
    for proc in leader:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=grace_s)
    stopped = len(tree)
    terminate([p for p in tree if p.is_running()], 2.0)
    terminate(group_and_tree(leader_pid), 2.0)  # anything spawned meanwhile
    return stopped

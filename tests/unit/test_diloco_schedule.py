"""When diloco exchanges and evaluates: one outer step every H steps, whatever the evals and checkpoints."""

from __future__ import annotations

import pytest

from swarm.train.worker.diloco.exchange import eval_due, exchange_due


def schedule(max_steps: int, every: int, eval_every: int) -> tuple[list[int], list[int]]:
    """(exchange steps, eval steps) as swarm.train.worker.loop decides them."""
    exchanges, evals, previous = [], [], 0
    for done in range(1, max_steps + 1):
        last = done == max_steps
        if exchange_due(done, every, last):
            if eval_due(done, previous, eval_every, last):
                evals.append(done)
            exchanges.append(done)
            previous = done
    return exchanges, evals


@pytest.mark.parametrize("eval_every", [1, 3, 5, 8, 20, 100])
def test_evals_add_no_outer_step(eval_every):
    # The run: sync_every 8 and eval_every 5 over 40 steps made 12 outer steps, not 5.
    exchanges, evals = schedule(40, 8, eval_every)
    assert exchanges == [8, 16, 24, 32, 40]
    assert set(evals) <= set(exchanges) and evals[-1] == 40


def test_an_eval_that_comes_due_between_exchanges_runs_at_the_next_one():
    assert schedule(40, 8, 5)[1] == [8, 16, 24, 32, 40]
    assert schedule(40, 8, 20)[1] == [24, 40]
    assert schedule(40, 8, 16)[1] == [16, 32, 40]


def test_a_run_that_does_not_end_on_a_multiple_of_h_exchanges_at_its_last_step():
    # The run's output is the global adapter: the last, partial round is exchanged too.
    assert schedule(20, 8, 100) == ([8, 16, 20], [20])

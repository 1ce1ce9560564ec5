"""The llama.cpp backend's tree bookkeeping: which sequence ids each tree row carries.

Pure functions, no llama.cpp needed. The attention rule they rely on (a row sees the cells
that carry its first sequence id at positions up to its own) must give exactly the
ancestor mask of dovetail.spec.tree, which these tests check by brute force.
"""
import random

import pytest

from dovetail.spec.tree import ancestor_mask, row_positions, with_root
from dovetail.workers.llama import _leaves, _row_seq_ids, _subtree_leaf

pytestmark = pytest.mark.timeout(30)


def random_parents(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(-1, i) for i in range(n)]


def llama_visibility(row_parents: list[int]) -> list[list[bool]]:
    """Row i sees row j iff j's cell carries i's first sequence id and pos(j) <= pos(i)."""
    leaves = _leaves(row_parents)
    ids = _row_seq_ids(row_parents, leaves, list(range(100, 100 + len(leaves))))
    pos = row_positions(row_parents, 0)
    return [[ids[i][0] in ids[j] and pos[j] <= pos[i] for j in range(len(row_parents))]
            for i in range(len(row_parents))]


@pytest.mark.parametrize("seed", range(200))
def test_sequence_ids_give_exactly_the_tree_mask(seed):
    rng = random.Random(seed)
    rows = with_root(random_parents(rng, rng.randrange(0, 24)))
    assert llama_visibility(rows) == ancestor_mask(rows).tolist()


def test_a_chain_needs_one_sequence_id():
    rows = with_root([-1, 0, 1, 2])
    leaves = _leaves(rows)
    assert leaves == [4]
    assert _row_seq_ids(rows, leaves, [7]) == [[7]] * 5


def test_every_row_of_a_leaf_path_carries_that_leaf():
    rows = with_root([-1, 0, 0, -1, 3])  # root -> a -> (b, c); root -> d -> e
    leaves = _leaves(rows)
    assert leaves == [2, 3, 5]
    ids = _row_seq_ids(rows, leaves, [0, 1, 2])
    assert ids == [[0, 1, 2], [0, 1], [0], [1], [2], [2]]


def test_subtree_leaf_is_below_the_row():
    rng = random.Random(5)
    for _ in range(50):
        rows = with_root(random_parents(rng, rng.randrange(1, 20)))
        leaves = _leaves(rows)
        for row in range(len(rows)):
            leaf = leaves[_subtree_leaf(rows, leaves, row)]
            assert leaf == row or row in _ancestors(rows, leaf)


def _ancestors(rows: list[int], node: int) -> list[int]:
    out = []
    while rows[node] >= 0:
        node = rows[node]
        out.append(node)
    return out

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


@pytest.mark.parametrize("seed", range(100))
def test_several_requests_in_one_batch_see_only_their_own_rows_and_prefix(seed):
    """verify_many's batch: each request's rows under its own ids (its sequence id and its
    leaves' scratch ids, drawn from one pool), after its own committed prefix. The visibility
    over all rows and prefix cells must be each request's tree mask, and nothing across."""
    from dovetail.workers.llama import _tree_rows
    rng = random.Random(seed)
    free = list(range(1000))
    rows, owner, prefix_cells = [], [], []  # prefix_cells: (sequence ids, position) of committed cells
    trees = []
    for req in range(rng.randrange(2, 6)):
        row_parents = with_root(random_parents(rng, rng.randrange(0, 12)))
        leaves = _leaves(row_parents)
        leaf_ids = [free.pop(rng.randrange(len(free))) for _ in leaves]
        start = rng.randrange(1, 8)
        prefix_cells += [(set(leaf_ids), p) for p in range(start)]  # seq_cp copies the prefix to every leaf id
        trees.append((len(rows), row_parents, start))
        rows += _tree_rows(row_parents, leaves, leaf_ids, start)
        owner += [req] * len(row_parents)
    n = len(rows)
    seen = [[rows[i][0][0] in rows[j][0] and rows[j][1] <= rows[i][1] for j in range(n)] for i in range(n)]
    for a, row_parents, _ in trees:
        k = len(row_parents)
        block = [r[a:a + k] for r in seen[a:a + k]]
        assert block == ancestor_mask(row_parents).tolist()
    assert all(not seen[i][j] for i in range(n) for j in range(n) if owner[i] != owner[j])
    for i in range(n):  # the committed cells a row sees: exactly its own request's prefix
        start = trees[owner[i]][2]
        visible = sum(rows[i][0][0] in ids and p <= rows[i][1] for ids, p in prefix_cells)
        assert visible == start

"""Draft trees as flat parent arrays (dovetail.spec.tree) and the coordinator's depth trim.

Hand-built trees only: every expected value below was worked out on paper from the
picture next to it, so a failure points at the helper, not at a model.
"""
import pytest
import torch

from dovetail.spec.tree import (
    ancestor_mask, chain_parents, check_parents, children, depths, is_chain, main_path,
    row_positions, trim_depth, trim_nodes, with_root,
)

# root
# ├── 0 ── 3 ── 5
# │    └── 4
# ├── 1
# └── 2 ── 6
TREE = [-1, -1, -1, 0, 0, 3, 2]


def test_chain_parents():
    assert chain_parents(0) == []
    assert chain_parents(1) == [-1]
    assert chain_parents(4) == [-1, 0, 1, 2]
    assert is_chain(chain_parents(4)) and is_chain([])
    assert not is_chain(TREE)


@pytest.mark.parametrize("parents", [[], [-1], chain_parents(5), TREE, [-1, -1, 1, 1, 0]])
def test_check_parents_accepts_valid_trees(parents):
    check_parents(parents)


@pytest.mark.parametrize("parents", [
    [0],            # a node cannot be its own parent
    [-1, 1],        # nor its own parent later in the list
    [-1, 2, 0],     # a parent must come before its child
    [-2],           # -1 is the only value below 0
    [-1, 0, 5],     # out of range
])
def test_check_parents_rejects_bad_parents(parents):
    with pytest.raises(ValueError):
        check_parents(parents)


def test_depths():
    assert depths([]) == []
    assert depths(chain_parents(3)) == [1, 2, 3]
    assert depths(TREE) == [1, 1, 1, 2, 2, 3, 2]


def test_children_keeps_sibling_order_and_lists_leaves():
    kids = children(TREE)
    assert kids == {-1: [0, 1, 2], 0: [3, 4], 1: [], 2: [6], 3: [5], 4: [], 5: [], 6: []}
    assert children([]) == {-1: []}


def test_main_path_follows_first_children():
    assert main_path(TREE) == [0, 3, 5]
    assert main_path(chain_parents(4)) == [0, 1, 2, 3]
    assert main_path([]) == []
    # The first child of the root is a leaf: the main path stops there even though
    # a later sibling has a deeper subtree.
    assert main_path([-1, -1, 1, 2]) == [0]


def test_with_root_shifts_parents_below_row_zero():
    assert with_root([]) == [-1]
    assert with_root(chain_parents(3)) == [-1, 0, 1, 2]
    assert with_root(TREE) == [-1, 0, 0, 0, 1, 1, 4, 3]


def test_ancestor_mask_on_tree_rows():
    rows = with_root(TREE)  # row 0 is the root, row i+1 is node i
    mask = ancestor_mask(rows)
    assert mask.dtype == torch.bool and mask.shape == (8, 8)
    expected_visible = {
        0: {0},
        1: {0, 1}, 2: {0, 2}, 3: {0, 3},
        4: {0, 1, 4}, 5: {0, 1, 5},
        6: {0, 1, 4, 6},
        7: {0, 3, 7},
    }
    for r, seen in expected_visible.items():
        assert set(torch.nonzero(mask[r]).flatten().tolist()) == seen, r
    # Every row sees itself and its ancestors only: depth + 1 entries (root has depth 0).
    assert mask.sum(dim=1).tolist() == [1] + [d + 1 for d in depths(TREE)]


def test_ancestor_mask_of_a_chain_is_causal():
    rows = with_root(chain_parents(4))
    assert torch.equal(ancestor_mask(rows), torch.tril(torch.ones(5, 5, dtype=torch.bool)))


def test_ancestor_mask_of_prefix_only_rows():
    # Several rows with parent -1 are independent: each sees only itself.
    assert torch.equal(ancestor_mask([-1, -1, -1]), torch.eye(3, dtype=torch.bool))


def test_row_positions():
    # The root sits at the first free cache position; a node sits one past its parent.
    assert row_positions(with_root(TREE), start=10) == [10, 11, 11, 11, 12, 12, 13, 12]
    assert row_positions(with_root(chain_parents(3)), start=0) == [0, 1, 2, 3]
    assert row_positions([-1, -1, 1], start=5) == [5, 5, 6]
    assert row_positions([], start=3) == []


def _token_paths(tokens, parents):
    """Each node's tokens from the root down: what a node *means*, independent of its index."""
    out = []
    for i, p in enumerate(parents):
        out.append((out[p] if p >= 0 else ()) + (tokens[i],))
    return out


def test_trim_depth_drops_deep_nodes_and_keeps_parents_valid():
    tokens = [10, 11, 12, 13, 14, 15, 16]
    new_tokens, new_parents = trim_depth(tokens, TREE, 2)
    check_parents(new_parents)
    assert max(depths(new_parents)) == 2
    assert new_tokens == [10, 11, 12, 13, 14, 16]  # node 5 (depth 3) is gone
    assert new_parents == [-1, -1, -1, 0, 0, 2]    # node 6 was renumbered to 5
    # Kept nodes still stand for the same token paths, and every shallow node was kept.
    kept = _token_paths(new_tokens, new_parents)
    assert kept == [p for p, d in zip(_token_paths(tokens, TREE), depths(TREE)) if d <= 2]


def test_trim_depth_to_one_keeps_the_root_children():
    tokens = [10, 11, 12, 13, 14, 15, 16]
    assert trim_depth(tokens, TREE, 1) == ([10, 11, 12], [-1, -1, -1])


def test_trim_depth_is_a_no_op_when_shallow_enough():
    tokens = [10, 11, 12, 13, 14, 15, 16]
    assert trim_depth(tokens, TREE, 3) == (tokens, TREE)
    assert trim_depth(tokens, TREE, 100) == (tokens, TREE)
    assert trim_depth([], [], 2) == ([], [])


def test_trim_depth_on_a_chain_is_truncation():
    tokens = [5, 6, 7, 8, 9]
    assert trim_depth(tokens, chain_parents(5), 3) == ([5, 6, 7], chain_parents(3))
    assert trim_depth(tokens, chain_parents(5), 0) == ([], [])


def test_trim_nodes_keeps_the_main_path_then_the_earliest_nodes():
    tokens = [10, 11, 12, 13, 14, 15, 16]
    assert trim_nodes(tokens, TREE, 7) == (tokens, TREE)
    new_tokens, new_parents = trim_nodes(tokens, TREE, 4)
    check_parents(new_parents)
    assert new_tokens == [10, 11, 13, 15]  # main path 0-3-5, then node 1
    assert new_parents == [-1, -1, 0, 2]
    assert trim_nodes(tokens, TREE, 2) == ([10, 13], [-1, 0])  # the main path, cut
    assert _token_paths(*trim_nodes(tokens, TREE, 5)) == [p for i, p in enumerate(_token_paths(tokens, TREE))
                                                            if i in (0, 1, 2, 3, 5)]

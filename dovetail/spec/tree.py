"""Draft trees as flat parent arrays, and the masks and positions that verify them.

A draft of n nodes hangs below a *root*: the last committed token, which the target has
not processed yet. ``parents[i]`` is the index of node i's parent, -1 for the root, and
parents come before children (``parents[i] < i``). A chain of k tokens is
``[-1, 0, 1, ..., k-2]``. Sibling order matters: the verifier tests children in order,
and the first child of every node is the draft's best guess (its "main path").
"""
from __future__ import annotations


def chain_parents(k: int) -> list[int]:
    return list(range(-1, k - 1))


def check_parents(parents: list[int]) -> None:
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"parents[{i}] = {p}: a parent must come before its child (-1 = root)")


def is_chain(parents: list[int]) -> bool:
    return all(p == i - 1 for i, p in enumerate(parents))


def depths(parents: list[int]) -> list[int]:
    """Depth of each node; children of the root have depth 1."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def children(parents: list[int]) -> dict[int, list[int]]:
    """Children of every node in sibling order; key -1 is the root."""
    kids: dict[int, list[int]] = {-1: []}
    for i, p in enumerate(parents):
        kids.setdefault(p, []).append(i)
        kids.setdefault(i, [])
    return kids


def main_path(parents: list[int]) -> list[int]:
    """Follow the first child from the root: the path the draft believes in most."""
    kids = children(parents)
    path, node = [], -1
    while kids.get(node):
        node = kids[node][0]
        path.append(node)
    return path


def with_root(parents: list[int]) -> list[int]:
    """Parents of the forward input ``[root, *nodes]``: row 0 is the root (-1 = prefix only)."""
    return [-1] + [p + 1 for p in parents]


def ancestor_mask(row_parents: list[int]) -> torch.Tensor:
    """Boolean [n, n] mask: row i sees itself and its ancestors among the n input rows."""
    import torch  # here, not at the top: the coordinator imports this module and needs no torch
    n = len(row_parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(row_parents):
        mask[i, i] = True
        if p >= 0:
            mask[i] |= mask[p]
    return mask


def row_positions(row_parents: list[int], start: int) -> list[int]:
    """Position id of each input row: rows with parent -1 sit at ``start``."""
    pos: list[int] = []
    for p in row_parents:
        pos.append(start if p < 0 else pos[p] + 1)
    return pos


def trim_nodes(tokens: list[int], parents: list[int], max_nodes: int) -> tuple[list[int], list[int]]:
    """Keep at most max_nodes nodes: the main path first, then the earliest nodes whose parent
    is kept (a valid tree in the same sibling order)."""
    if len(tokens) <= max_nodes:
        return tokens, parents
    keep = set(main_path(parents)[:max(0, max_nodes)])
    for i, p in enumerate(parents):
        if len(keep) >= max_nodes:
            break
        if i not in keep and (p < 0 or p in keep):
            keep.add(i)
    order = sorted(keep)
    index = {old: new for new, old in enumerate(order)}
    return [tokens[i] for i in order], [-1 if parents[i] < 0 else index[parents[i]] for i in order]


def trim_depth(tokens: list[int], parents: list[int], max_depth: int) -> tuple[list[int], list[int]]:
    """Drop nodes deeper than max_depth: tokens past the length limit cost verify time for nothing."""
    d = depths(parents)
    if not d or max(d) <= max_depth:
        return tokens, parents
    keep = [i for i in range(len(tokens)) if d[i] <= max_depth]
    index = {old: new for new, old in enumerate(keep)}
    return [tokens[i] for i in keep], [-1 if parents[i] < 0 else index[parents[i]] for i in keep]

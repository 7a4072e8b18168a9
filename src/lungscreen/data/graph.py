"""Connected components of "belongs with" relations (same patient, near-duplicate images).

Splits must keep a patient's images, and every near-duplicate of them, on one side; duplicates must be
reported as groups. Both are connected components of a graph over the rows, which scipy computes.

Example:
    >>> connected_components(5, [(0, 1), (3, 4)]).tolist()
    [0, 0, 1, 2, 2]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as _scipy_components


def connected_components(count: int, edges: Iterable[tuple[int, int]]) -> np.ndarray:
    """A component id per node (0..k-1, numbered in order of each component's first node)."""
    pairs = np.asarray(list(edges), dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(count, count))
    _, labels = _scipy_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(np.argsort(first))  # renumber components by their first node
    return order[labels]


def chain_edges(groups: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """Edges joining the members of each group (a chain is enough for connectivity)."""
    return [(int(a), int(b)) for members in groups for a, b in zip(members[:-1], members[1:], strict=True)]

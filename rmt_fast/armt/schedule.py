"""The orders in which FastARMT runs the (segment s, layer l) cells of a call.

Cell (s, l) needs (s, l - 1) (its input: the segment's hidden states after the layer below) and (s - 1, l)
(its memory: layer l's state after the previous segment's write). Both schedules respect that:

* sequential: segment by segment, layer by layer: N x L steps of one cell;
* diagonal: step d runs every cell with s + l = d at once (an anti-diagonal of the N x L grid):
  N + L - 1 steps. The cells of one step have consecutive layers ``l0 .. l1``, so the step slices the
  stacked layer weights; cell g runs layer ``l0 + g`` on segment ``d - l0 - g``.

A step is ``(l0, segments)``: its cells run layers ``l0, l0 + 1, ...`` on ``segments[0], segments[1], ...``.
"""

from __future__ import annotations


def sequential(n_segments: int, n_layers: int) -> list[tuple[int, list[int]]]:
    return [(layer, [s]) for s in range(n_segments) for layer in range(n_layers)]


def diagonal(n_segments: int, n_layers: int) -> list[tuple[int, list[int]]]:
    steps = []
    for d in range(n_segments + n_layers - 1):
        l0, l1 = max(0, d - n_segments + 1), min(d, n_layers - 1)
        steps.append((l0, [d - layer for layer in range(l0, l1 + 1)]))
    return steps


def check_order(steps: list[tuple[int, list[int]]], n_segments: int, n_layers: int) -> None:
    """Raise AssertionError unless ``steps`` runs every cell once, after both cells it depends on."""
    done = set()
    for l0, segs in steps:
        cells = [(s, l0 + g) for g, s in enumerate(segs)]
        for s, layer in cells:
            assert (s, layer) not in done, f"cell {(s, layer)} runs twice"
            assert layer == 0 or (s, layer - 1) in done, f"cell {(s, layer)} before its input {(s, layer - 1)}"
            assert s == 0 or (s - 1, layer) in done, f"cell {(s, layer)} before its memory {(s - 1, layer)}"
        done.update(cells)
    assert len(done) == n_segments * n_layers, "some cells never run"

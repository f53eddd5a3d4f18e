"""Draw the order in which FastARMT runs the (segment, layer) cells: sequential vs anti-diagonal.

python scripts/draw_diagonal.py [--out docs/armt_diagonal.png] [--segments 6] [--layers 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rmt_fast.armt import schedule  # noqa: E402


def step_grid(steps, n_segments, n_layers):
    grid = [[0] * n_segments for _ in range(n_layers)]
    for i, (l0, segs) in enumerate(steps):
        for g, s in enumerate(segs):
            grid[l0 + g][s] = i
    return grid


def draw(out: Path, n_segments: int, n_layers: int) -> Path:
    orders = [
        ("sequential: N x L = {} steps", schedule.sequential(n_segments, n_layers)),
        ("diagonal: N + L - 1 = {} steps", schedule.diagonal(n_segments, n_layers)),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, (title, steps) in zip(axes, orders):
        schedule.check_order(steps, n_segments, n_layers)
        grid = step_grid(steps, n_segments, n_layers)
        ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
        for layer in range(n_layers):
            for s in range(n_segments):
                ax.text(s, layer, str(grid[layer][s]), ha="center", va="center", color="white", fontsize=10)
        ax.set_xticks(range(n_segments), [f"s{s}" for s in range(n_segments)])
        ax.set_yticks(range(n_layers), [f"layer {layer}" for layer in range(n_layers)])
        ax.set_xlabel("segment")
        ax.set_title(title.format(len(steps)))
    fig.suptitle("Step at which each (segment, layer) cell runs: cell (s, l) needs (s, l-1) and (s-1, l)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "armt_diagonal.png")
    parser.add_argument("--segments", type=int, default=6)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    print(draw(args.out, args.segments, args.layers))

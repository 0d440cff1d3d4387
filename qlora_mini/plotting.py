"""The book's one plotting helper (hand-written plumbing, not generated from a notebook).

Every figure in the book goes through :func:`figure`, so all share one size and style, and axes
always carry labels with units.
"""
from __future__ import annotations

import matplotlib.pyplot as plt

FIGSIZE = (6.4, 3.6)  # inches; one size for every figure in the book


def figure(xlabel: str, ylabel: str, title: str | None = None, *, ncols: int = 1,
           logx: bool = False, logy: bool = False):
    """A new figure with labelled axes: returns ``(fig, ax)``, or ``(fig, axes)`` for ncols > 1."""
    fig, axes = plt.subplots(1, ncols, figsize=(FIGSIZE[0] * (1 + 0.6 * (ncols - 1)), FIGSIZE[1]),
                             layout="constrained", squeeze=False)
    for ax in axes[0]:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
    if title:
        fig.suptitle(title)
    return (fig, axes[0][0]) if ncols == 1 else (fig, axes[0])

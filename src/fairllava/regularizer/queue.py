"""A FIFO (MoCo-style) queue of past rows' attribute labels and strata, used as extra CLUB negatives.

Why labels only: the negative term is sum_j log q(y_j | z_i) over partners j, so a partner enters through its
label alone (METHOD.md §4's identity sum_j L_ij = sum_k c_k log q(k | z_i)); the anchors z_i are the current
micro-batch, which carries the gradient. Past z would enter only as anchors without gradient (value, no
training signal) and cost ``queue_size x D`` memory, so they are not kept. The heads that score the anchors are
always the current ones ("the DAC stays up to date"); queue entries are plain integers, detached by nature.
With 6–8 samples per micro-batch the batch's label marginal is a poor stand-in for p(a) (and, conditionally,
p(a | s)); the queue makes it a running estimate over ``queue_size`` rows.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn


class LabelQueue(nn.Module):
    """``size`` rows of ``[labels per attribute, stratum]``; empty slots hold ``ignore_index`` (never partners)."""

    def __init__(self, names: list[str], size: int, ignore_index: int) -> None:
        super().__init__()
        self.names = list(names)
        self.ignore_index = ignore_index
        self.register_buffer("labels", torch.full((size, len(names)), ignore_index, dtype=torch.long))
        self.register_buffer("strata", torch.full((size,), ignore_index, dtype=torch.long))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))  # rows ever pushed (monotone)

    def partners(self, name: str) -> torch.Tensor:
        return self.labels[:, self.names.index(name)]

    @torch.no_grad()
    def push(self, labels: Mapping[str, torch.Tensor], strata: torch.Tensor | None) -> None:
        """Append one batch's rows (oldest rows are overwritten; a batch larger than the queue keeps its tail)."""
        y = torch.stack([labels[n].long() for n in self.names], dim=1).to(self.labels.device)
        if strata is None:
            s = torch.full_like(y[:, 0], self.ignore_index)
        else:
            s = strata.long().to(self.labels.device)
        size = self.labels.shape[0]
        y, s = y[-size:], s[-size:]
        pos = (self.seen + torch.arange(y.shape[0], device=y.device)) % size
        self.labels[pos] = y
        self.strata[pos] = s
        self.seen += y.shape[0]

    def extra_repr(self) -> str:
        return f"size={self.labels.shape[0]}, attributes={self.names}"

"""What a row of a denoiser call is conditioned on besides its latent and timestep.

Every family reads the prompt's hidden states ([n, tokens, d]: SD 1.x / 2.x and SDXL's 77 CLIP
tokens, SD 3.5's CLIP and T5 tokens, FLUX.1's T5 tokens). SDXL, SD 3.5 and FLUX.1 also read a
pooled text embedding, and SDXL six "time ids" (original size, crop corner, target size).
`Conditioning` carries all of it for n rows, so the inversion, the reference rows and the style
rows are built the same way for every family, and rows of one call are concatenated in one place
(`cat`). How a denoiser reads it is its backbone's (`Backbone.predict`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch


@dataclass(frozen=True)
class Conditioning:
    """Conditioning of n rows: hidden states [n, tokens, d]; pooled [n, p] where the family has one; SDXL's time ids [n, 6]."""

    hidden: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, rows: slice | int) -> "Conditioning":
        """Rows as a Conditioning (an int keeps its row dimension: `c[2]` is `c[2:3]`)."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        return Conditioning(*(None if t is None else t[rows] for t in (self.hidden, self.pooled, self.time_ids)))

    def split(self) -> list["Conditioning"]:
        return [self[index] for index in range(len(self))]

    def expand(self, rows: int) -> "Conditioning":
        """A one-row conditioning repeated for `rows` rows (no copy)."""
        return Conditioning(*(None if t is None else t.expand(rows, *t.shape[1:]) for t in (self.hidden, self.pooled, self.time_ids)))

    def to(self, *args: Any, **kwargs: Any) -> "Conditioning":
        """`Tensor.to` on every part; time ids keep their own dtype (they are sizes in pixels)."""
        moved = [None if t is None else t.to(*args, **kwargs) for t in (self.hidden, self.pooled)]
        time_ids = None if self.time_ids is None else self.time_ids.to(moved[0].device)
        return Conditioning(moved[0], moved[1], time_ids)

    def with_time_ids(self, time_ids: Optional[torch.Tensor]) -> "Conditioning":
        """The same rows with these time ids ([1, 6] or [n, 6]); None leaves them as they are."""
        if time_ids is None:
            return self
        return replace(self, time_ids=time_ids.to(self.hidden.device).expand(len(self), -1))

    def equals(self, other: "Conditioning") -> bool:
        pairs = zip((self.hidden, self.pooled, self.time_ids), (other.hidden, other.pooled, other.time_ids))
        return all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b)) for a, b in pairs)

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        """Rows of several conditionings in order (all with or all without the SDXL parts)."""
        parts = []
        for name in ("hidden", "pooled", "time_ids"):
            tensors = [getattr(item, name) for item in items]
            if all(t is None for t in tensors):
                parts.append(None)
            elif any(t is None for t in tensors):
                raise ValueError(f"cannot mix rows with and without {name} in one UNet call")
            else:
                parts.append(torch.cat(tensors))
        return Conditioning(*parts)

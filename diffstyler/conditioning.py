"""What a UNet row is conditioned on besides its latent and timestep.

Stable Diffusion 1.x and 2.x read one tensor, the prompt's hidden states (`encoder_hidden_states`,
[n, 77, d]). SDXL also reads the pooled embedding of its second text encoder and six "time ids"
(original size, crop corner, target size) through `added_cond_kwargs`. `Conditioning` carries all of
it for n rows, so the inversion, the reference rows and the style rows are built the same way for
every model family, and rows of one UNet call are concatenated in one place (`cat`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch


@dataclass(frozen=True)
class Conditioning:
    """Conditioning of n rows: hidden states [n, 77, d]; for SDXL also pooled [n, p] and time ids [n, 6]."""

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

    def unet_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `UNet2DConditionModel.forward` for these rows."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            if self.time_ids is None:
                # SDXL's UNet would fail deep inside its embedding; the size is known where rows are built.
                raise ValueError("SDXL rows need time ids: attach them with with_time_ids(families.time_ids_for(...))")
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

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

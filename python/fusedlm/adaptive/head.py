"""The ADAPTIVEDECODER head: a small MLP on the LM's last hidden state that outputs a
categorical distribution over a fixed set of temperatures (Dhuliawala et al., 2024, Eq. 3).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fusedlm

__all__ = ["AdaptiveDecoder", "DEFAULT_TEMPERATURES", "LEVELS"]

DEFAULT_TEMPERATURES: Tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
LEVELS = ("token", "sequence")
TAU_MODES = ("argmax", "sample")


def check_level(level) -> str:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    return level


def check_temperatures(temperatures) -> list:
    """The head's K candidate temperatures as floats: at least one, finite, >= 0, distinct
    (two equal choices split one choice's probability)."""
    temps = [float(t) for t in temperatures]
    if len(temps) < 1 or any(not 0 <= t < math.inf for t in temps):
        raise ValueError(f"temperatures must be a non-empty list of finite values >= 0, got {temps}")
    if len(set(temps)) != len(temps):
        raise ValueError(f"temperatures must be distinct, got {temps}")
    return temps


class AdaptiveDecoder(nn.Module):
    """``P(tau_k | h) = softmax(MLP(h))_k`` over ``K`` fixed temperatures.

    Args:
        hidden_size: width of the LM hidden state ``h`` (the vector the un-embedding reads).
        temperatures: the K candidate temperatures; 0 means greedy (exact argmax).
        level: ``"token"`` (the head runs at every decoding step, ``tau_t`` samples token
            ``t``) or ``"sequence"`` (the head runs once on the last prompt token and its
            ``tau`` is used for the whole reply).
        mlp_hidden: hidden width of the MLP (2048 in the paper).
        num_layers: number of linear layers (3 in the paper), SiLU between them.
        zero_init: zero the last layer so the initial distribution is exactly uniform (the
            paper samples LPO data from an "initially roughly uniform" head; the uniform
            head is also the reference of the latent loss, Eq. 11).

    The head keeps its parameters in float32 and casts ``h`` to them, so it can sit on top
    of a bfloat16 LM.
    """

    def __init__(self, hidden_size: int, temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
                 level: str = "token", mlp_hidden: int = 2048, num_layers: int = 3,
                 zero_init: bool = True):
        super().__init__()
        check_level(level)
        temps = check_temperatures(temperatures)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if hidden_size < 1 or (num_layers > 1 and mlp_hidden < 1):
            raise ValueError(f"hidden_size and mlp_hidden must be >= 1, got {hidden_size} and {mlp_hidden}")
        self.hidden_size = int(hidden_size)
        self.level = level
        self.mlp_hidden = int(mlp_hidden)
        self.num_layers = int(num_layers)
        self.zero_init = bool(zero_init)
        self.register_buffer("temperatures", torch.tensor(temps, dtype=torch.float32))
        layers = []
        width = self.hidden_size
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, self.mlp_hidden), nn.SiLU()]
            width = self.mlp_hidden
        layers.append(nn.Linear(width, len(temps)))
        self.mlp = nn.Sequential(*layers)
        if zero_init:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    @property
    def num_temperatures(self) -> int:
        return self.temperatures.numel()

    def config(self) -> dict:
        return dict(hidden_size=self.hidden_size, temperatures=self.temperatures.tolist(),
                    level=self.level, mlp_hidden=self.mlp_hidden, num_layers=self.num_layers,
                    zero_init=self.zero_init)

    def extra_repr(self) -> str:
        return f"level={self.level!r}, temperatures={self.temperatures.tolist()}"

    # ------------------------------------------------------------------ distribution
    def forward(self, hidden: Tensor) -> Tensor:
        """Logits over the K temperatures, shape ``hidden.shape[:-1] + (K,)``."""
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden has width {hidden.shape[-1]}, the head expects "
                             f"{self.hidden_size}")
        w = self.mlp[0].weight
        return self.mlp(hidden.to(device=w.device, dtype=w.dtype))

    def log_probs(self, hidden: Tensor) -> Tensor:
        """``log P(tau_k | h)``, shape ``hidden.shape[:-1] + (K,)``."""
        return F.log_softmax(self(hidden), dim=-1)

    def probs(self, hidden: Tensor) -> Tensor:
        return self.log_probs(hidden).exp()

    @torch.no_grad()
    def select(self, hidden: Tensor, mode: str = "argmax",
               generator: Optional[torch.Generator] = None, *, seed: Optional[Tensor] = None,
               offset: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
        """Choose a temperature per row without a host sync.

        ``mode="argmax"`` is the paper's inference rule (Eq. 4), ``"sample"`` draws
        ``tau ~ P(tau | h)`` (Eq. 5; used to build LPO data): with per-row ``seed`` (int64
        ``[B]``, ``hidden`` ``[B, D]``) by :func:`fusedlm.sample` on the Philox stream
        ``(seed, offset)``, so that a row's draw does not depend on the batch; else by
        Gumbel-max with ``generator``.
        Returns ``(index [..], temperature [..], log P(tau | h) [..])``.
        """
        if mode not in TAU_MODES:
            raise ValueError(f"mode must be one of {TAU_MODES}, got {mode!r}")
        logp = self.log_probs(hidden)
        if mode == "argmax":
            index = logp.argmax(-1)
        elif seed is not None:
            if logp.dim() != 2:
                raise ValueError(f"select with seed needs hidden [B, D], got {tuple(hidden.shape)}")
            index = fusedlm.sample(logp.detach().float(), 1.0, seed=seed, offset=offset)
        else:
            u = torch.rand(logp.shape, device=logp.device, dtype=logp.dtype, generator=generator)
            u = u.clamp_(min=torch.finfo(u.dtype).tiny)
            index = (logp - torch.log(-torch.log(u))).argmax(-1)
        return index, self.temperatures[index], logp.gather(-1, index[..., None])[..., 0]

    # ------------------------------------------------------------------ persistence
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Save config + weights to one file (``torch.save``); reload with :meth:`load`."""
        d = os.path.dirname(os.fspath(path))
        if d:
            os.makedirs(d, exist_ok=True)
        torch.save({"format": "fusedlm.adaptive.AdaptiveDecoder/1", "config": self.config(),
                    "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}},
                   path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], map_location="cpu") -> "AdaptiveDecoder":
        blob = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
            raise ValueError(f"{path} is not an AdaptiveDecoder checkpoint")
        head = cls(**blob["config"])
        head.load_state_dict(blob["state_dict"])
        return head

"""The language-model backbone around a sequence mixer.

    h_0 = E[x] (+ P[0:T] with learned positions)
    h_l = h'_l + MLP(norm(h'_l)),   h'_l = h_{l-1} + Mixer(norm(h_{l-1}))      (pre-norm; the MLP is optional)
    logits = W_out norm(h_N), only at labelled positions when a label mask is given
With `tie_embeddings` (the default) W_out = E. On recall tasks the linear memories need it: they return a mix
of value embeddings, which a tied output layer scores as the right value; cut apart (untied, or the output
loss kept from training E: `detach_head`), they stayed at chance on MQAR with V = 8192 (docs/results/fidelity/).
Softmax attention is harmed by what the tie does to its input embedding unless its q and k are normalised,
which `models/attention.py` does by default.

Initialisation (`init_std`, default 0.02, Zoology's and GPT-2's scheme): every linear and embedding weight
N(0, init_std), the blocks' output projections N(0, init_std / sqrt(2 n_layers)); `init_std=None` keeps
PyTorch's per-layer defaults (embeddings N(0, 0.02)), under which a linear mixer's output starts several times
larger than the embedding and gated DeltaNet and MoM learned MQAR later or not at all.
Diagnostic options (docs/results/fidelity/): `center_embeddings` reads E minus its mean row (the part every
token shares, which softmax ignores); `head_init="embedding"` starts an untied output layer as a copy of E;
`detach_head` keeps the output loss from training the output layer (E itself when tied).

Norms are RMSNorm, the MLP is SwiGLU. `build_model` validates the settings (unknown mixer or mixer option:
ValueError naming the key and the valid values) and records the resolved arguments in `model.config`. `forward`
and `step` check their inputs before any work (`check_ids`: dtype, shape, an empty batch or sequence refused, the
ids' range on the CPU), the mixers theirs (`models.common.check_input`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import Attention
from models.common import check_backend, check_choice, check_flag, check_int, check_number
from models.mom import MoM, rule_mixers


class _Mixers(Mapping):
    """Every mixer by name: attention, the single-memory mixer of each rule declared in `kernels.rules`, and mom.
    Read at each use, so that a rule declared later (a test's toy rule) is a mixer too."""

    def _table(self) -> dict[str, type[nn.Module]]:
        return {"attention": Attention, **rule_mixers(), "mom": MoM}

    def __getitem__(self, name: str) -> type[nn.Module]:
        return self._table()[name]

    def __iter__(self):
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


MIXERS = _Mixers()

_NOT_OPTIONS = ("self", "d_model", "backend", "num_slots")  # given by the backbone, or internal to MoM


def mixer_option_defaults(mixer: str) -> dict:
    """The options a mixer takes (its constructor's keyword arguments) with their defaults."""
    check_choice("mixer", mixer, tuple(MIXERS))
    params = inspect.signature(MIXERS[mixer].__init__).parameters
    return {k: p.default for k, p in params.items() if k not in _NOT_OPTIONS and p.kind is p.KEYWORD_ONLY}


RMSNorm = nn.RMSNorm


class SwiGLU(nn.Module):
    """y = W_2 (silu(W_1 x) * W_3 x), hidden width 8/3 d rounded up to a multiple of 8."""

    def __init__(self, d_model: int):
        super().__init__()
        hidden = -(-8 * d_model // 3 // 8) * 8
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w_in(x).chunk(2, -1)
        return self.w_out(F.silu(a) * b)


class Block(nn.Module):
    def __init__(self, d_model: int, mixer: nn.Module, mlp: bool):
        super().__init__()
        self.mixer_norm, self.mixer = RMSNorm(d_model, eps=1e-5), mixer
        self.mlp_norm = RMSNorm(d_model, eps=1e-5) if mlp else None
        self.mlp = SwiGLU(d_model) if mlp else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.mixer(self.mixer_norm(h))
        return h if self.mlp is None else h + self.mlp(self.mlp_norm(h))

    def step(self, h: torch.Tensor, state) -> tuple[torch.Tensor, object]:
        y, state = self.mixer.step(self.mixer_norm(h), state)
        h = h + y
        return (h if self.mlp is None else h + self.mlp(self.mlp_norm(h))), state


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [n_labelled, V] at label_mask (row-major order), or [B, T, V] without a mask
    aux_loss: torch.Tensor  # scalar: sum over layers of aux_loss_coef * auxiliary loss (0 without MoM)


class LanguageModel(nn.Module):
    def __init__(
        self,
        *,
        vocab_size: int,
        max_seq_len: int,
        mixer: str,
        d_model: int = 64,
        n_layers: int = 2,
        mlp: bool = False,
        learned_positions: bool = False,
        tie_embeddings: bool = True,
        init_std: float | None = 0.02,
        center_embeddings: bool = False,
        head_init: str = "random",
        detach_head: bool = False,
        backend: str = "auto",
        mixer_options: dict | None = None,
    ):
        super().__init__()
        for key, value in (("vocab_size", vocab_size), ("max_seq_len", max_seq_len), ("n_layers", n_layers)):
            check_int(key, value)
        check_int("d_model", d_model)
        check_choice("mixer", mixer, tuple(MIXERS))
        check_backend(backend)
        check_flag("mlp", mlp)
        check_flag("learned_positions", learned_positions)
        check_flag("tie_embeddings", tie_embeddings)
        if init_std is not None:
            check_number("init_std", init_std, positive=True)
        check_flag("center_embeddings", center_embeddings)
        check_choice("head_init", head_init, ("random", "embedding"))
        if tie_embeddings and head_init != "random":
            raise ValueError(f"head_init={head_init!r} needs tie_embeddings=false (a tied output layer is E)")
        check_flag("detach_head", detach_head)
        if mixer_options is not None and not isinstance(mixer_options, Mapping):  # dict() would fail obscurely
            raise ValueError(f"mixer_options={mixer_options!r} is not valid; it must be a mapping of option names "
                             f"to values (valid keys: {sorted(mixer_option_defaults(mixer))})")  # fmt: skip
        options = dict(mixer_options or {})
        valid = mixer_option_defaults(mixer)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"mixer_options: unknown keys {unknown} for mixer={mixer!r}; valid keys: {sorted(valid)}"
            )
        options = {**valid, **options}
        self.config = {
            "vocab_size": vocab_size,
            "max_seq_len": max_seq_len,
            "mixer": mixer,
            "d_model": d_model,
            "n_layers": n_layers,
            "mlp": mlp,
            "learned_positions": learned_positions,
            "tie_embeddings": tie_embeddings,
            "init_std": init_std,
            "center_embeddings": center_embeddings,
            "head_init": head_init,
            "detach_head": detach_head,
            "backend": backend,
            "mixer_options": options,
        }

        self.embed = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_seq_len, d_model) if learned_positions else None
        self.blocks = nn.ModuleList(
            Block(d_model, MIXERS[mixer](d_model, backend=backend, **options), mlp) for _ in range(n_layers)
        )
        self.norm = RMSNorm(d_model, eps=1e-5)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        for emb in (self.embed, self.positions):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        if init_std is not None:
            self._init_normal(init_std)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        elif head_init == "embedding":
            with torch.no_grad():
                self.head.weight.copy_(self.embed.weight)

    def _init_normal(self, std: float) -> None:
        """Every linear and embedding weight from N(0, std), the blocks' output projections from
        N(0, std / sqrt(2 n_layers)) (GPT-2's scheme: the residual stream keeps its scale with depth)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
        residual_std = std / (2 * len(self.blocks)) ** 0.5
        for name, param in self.blocks.named_parameters():
            if name.endswith(("o_proj.weight", "mlp.w_out.weight")):
                nn.init.normal_(param, std=residual_std)

    def embedding_weight(self) -> torch.Tensor:
        """The token embedding as the model reads it: with `center_embeddings`, minus its mean row (see the
        module docstring)."""
        weight = self.embed.weight
        return weight - weight.mean(0) if self.config["center_embeddings"] else weight

    def _embed(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        try:
            h = F.embedding(input_ids, self.embedding_weight())
        except IndexError:  # on the CPU; the ids are not read before, which on CUDA would sync every forward
            raise _out_of_range("input_ids", input_ids, self.config["vocab_size"], "vocab_size") from None
        if self.positions is not None:
            end = start + (input_ids.shape[1] if input_ids.dim() == 2 else 1)
            if end > self.config["max_seq_len"]:
                raise ValueError(f"sequence length {end} exceeds max_seq_len={self.config['max_seq_len']}")
            pos = self.positions.weight[start:end]
            h = h + (pos if input_ids.dim() == 2 else pos[0])
        return h

    def forward(self, input_ids: torch.Tensor, label_mask: torch.Tensor | None = None,
                label_index: torch.Tensor | None = None, stats_positions: torch.Tensor | None = None) -> ModelOutput:
        """input_ids [B, T] int64; label_mask [B, T] bool, or label_index [N] int64 (flat positions b T + t, in
        the order given: a count the caller fixes, where a mask's selection reads its count from the device),
        or neither. stats_positions [B, T] bool: the positions that the routers' content loads count (MoM)."""
        check_ids("input_ids", input_ids, "B, T")
        for name, mask in (("label_mask", label_mask), ("stats_positions", stats_positions)):
            if mask is not None and (mask.shape != input_ids.shape or mask.dtype != torch.bool):
                raise ValueError(f"{name} must be a bool tensor of shape {list(input_ids.shape)}, "
                                 f"got {mask.dtype} of shape {list(mask.shape)}")  # fmt: skip
        if label_index is not None:
            if label_mask is not None:
                raise ValueError("give label_mask or label_index, not both: each selects the labelled positions")
            check_ids("label_index", label_index, "N", empty=True)
        routers = [block.mixer for block in self.blocks if hasattr(block.mixer, "stats_positions")]
        for router in routers:
            router.stats_positions = stats_positions
        h = self._embed(input_ids, 0)
        for block in self.blocks:
            h = block(h)
        for router in routers:  # not kept past the forward (under vmap it would be a batched tensor)
            router.stats_positions = None
        if label_index is not None:
            try:
                h = h.flatten(0, 1)[label_index]
            except IndexError:  # on the CPU, as in `_embed`
                raise _out_of_range("label_index", label_index, input_ids.numel(), "B * T") from None
        if label_mask is not None:
            h = h[label_mask]
        logits = self.logits(self.norm(h))
        aux = torch.zeros((), device=logits.device)
        for block in self.blocks:
            mixer_aux = getattr(block.mixer, "aux_loss", None)
            if mixer_aux is not None:
                aux = aux + mixer_aux
        return ModelOutput(logits=logits, aux_loss=aux)

    def router_stats(self, as_tensors: bool = False) -> dict:
        """Router statistics of the MoM layers from the last forward (empty for other mixers): floats, or with
        `as_tensors` 0-dim tensors on the device (no host sync)."""
        stats = {}
        for i, block in enumerate(self.blocks):
            if hasattr(block.mixer, "router_stats"):
                stats.update({f"layer{i}/{k}": v for k, v in block.mixer.router_stats(as_tensors).items()})
        return stats

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.head.weight.detach() if self.config["detach_head"] else self.head.weight
        return F.linear(h, weight)

    @torch.no_grad()
    def embedding_stats(self) -> dict[str, torch.Tensor]:
        """How far the rows of the embedding (and of an untied output layer) share one common vector:
        |mean row| / rms of the rows about it. Near 0 at initialisation; large when every token's vector
        has moved the same way, so that tokens look alike to the mixers (the input) or the common part
        does nothing (the output, where softmax ignores it). Tensors on the device, no host sync."""
        matrices = {"embed": self.embed.weight}
        if not self.config["tie_embeddings"]:
            matrices["head"] = self.head.weight
        return {f"{name}_common": common_part(weight) for name, weight in matrices.items()}

    def init_state(self, batch_size: int) -> dict:
        return {"position": 0, "layers": [block.mixer.init_state(batch_size) for block in self.blocks]}

    def step(self, input_ids: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """One token per sequence: input_ids [B] -> (logits [B, V], new state)."""
        check_ids("input_ids", input_ids, "B")
        h = self._embed(input_ids, state["position"])
        layers = []
        for block, layer_state in zip(self.blocks, state["layers"]):
            h, layer_state = block.step(h, layer_state)
            layers.append(layer_state)
        return self.logits(self.norm(h)), {"position": state["position"] + 1, "layers": layers}

    def state_size(self, seq_len: int) -> int:
        check_int("seq_len", seq_len, low=0)
        return sum(block.mixer.state_size(seq_len) for block in self.blocks)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_ids(name: str, ids, letters: str, empty: bool = False) -> None:
    """Integer ids of shape [letters], every size >= 1 (`empty`: sizes may be 0). An empty batch or sequence is
    refused: it failed in a reshape deep in the mixers (and MoM's load statistics would be NaN). Their values are
    not read (on CUDA that would sync every forward): an id out of range is named where it is used
    (`_out_of_range`, on the CPU; on CUDA the embedding stops with a device-side assert)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be an int64 (or int32) tensor [{letters}], got {got}")
    if ids.dim() != letters.count(",") + 1 or (not empty and 0 in ids.shape):
        sizes = "" if empty else " with every size >= 1"
        raise ValueError(f"{name} must have shape [{letters}]{sizes}, got {list(ids.shape)}")


def _out_of_range(name: str, ids: torch.Tensor, high: int, high_name: str) -> ValueError:
    """The error for ids that indexing refused (read now that it failed: the cost no longer matters)."""
    low, top = (int(x) for x in torch.aminmax(ids))
    return ValueError(f"{name} must lie in [0, {high_name}={high}), got values from {low} to {top}")


def common_part(weight: torch.Tensor) -> torch.Tensor:
    """|mean row| / rms of the rows about it (`LanguageModel.embedding_stats`)."""
    mean = weight.float().mean(0)
    return mean.norm() / (weight.float() - mean).pow(2).sum(-1).mean().sqrt()


def build_model(**settings) -> LanguageModel:
    """The language model of `settings` (LanguageModel's keyword arguments: vocab_size, max_seq_len, mixer,
    d_model, n_layers, mlp, learned_positions, tie_embeddings, init_std, center_embeddings, head_init,
    detach_head, backend, mixer_options)."""
    return LanguageModel(**settings)

"""SparseMultiheadAttention: a drop-in nn.MultiheadAttention whose four projections store only their kept weights."""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._fx import traced_call
from .linear import SparseLinear
from ._sparse_weight import check_mask, random_mask, refuse_meta

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
# nn.MultiheadAttention's in-projection weights (kdim == vdim == embed_dim: q, k, v stacked; else one each)
ATTENTION_IN_PROJ = ("in_proj_weight",)
ATTENTION_QKV_PROJ = tuple(f"{p}_weight" for p in _PROJECTIONS)


def projection_weights(mha: nn.MultiheadAttention) -> dict[str, torch.Tensor]:
    """An nn.MultiheadAttention's projection weights by parameter name: ``in_proj_weight`` (q, k and v stacked,
    when kdim == vdim == embed_dim) or ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``, then
    ``out_proj.weight``. What ``pysparse.prune`` scores and ``masks`` name."""
    names = ATTENTION_IN_PROJ if mha._qkv_same_embed_dim else ATTENTION_QKV_PROJ
    return {**{n: getattr(mha, n) for n in names}, "out_proj.weight": mha.out_proj.weight}


def out_proj_owners(model: nn.Module) -> dict[int, nn.MultiheadAttention]:
    """id(out_proj) -> its nn.MultiheadAttention, for every attention of ``model``: an out_proj is an nn.Linear
    that is never called (the attention reads its weight), so hooks on it see nothing."""
    return {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def attention_values(mha: nn.MultiheadAttention, args, kwargs) -> torch.Tensor:
    """The input of ``mha.out_proj`` in the call ``mha(*args, **kwargs)``: the call again with an identity output
    projection (dropout off)."""
    from torch.func import functional_call

    w = mha.out_proj.weight
    identity = {"out_proj.weight": torch.eye(w.shape[1], dtype=w.dtype, device=w.device)}
    if mha.out_proj.bias is not None:
        identity["out_proj.bias"] = torch.zeros_like(mha.out_proj.bias)
    was_training = mha.training
    mha.eval()
    try:
        with torch.no_grad():
            return functional_call(mha, identity, args, {**kwargs, "need_weights": False})[0]
    finally:
        mha.train(was_training)


def input_site(module: nn.Module, attr: str, owners: dict[int, nn.MultiheadAttention]) -> tuple[nn.Module, str]:
    """Where the input of ``module``'s weight ``attr`` can be observed, and how (``owners``: :func:`out_proj_owners`):
    (the attention, "out_proj") for an attention's out_proj, which is never called; (the attention, ``attr``) for
    its in-projection; (``module``, "layer") for an nn.Linear / nn.Conv2d, whose call's first argument it is. The
    kind is what :func:`projection_inputs` takes."""
    if id(module) in owners:
        return owners[id(module)], "out_proj"
    if isinstance(module, nn.MultiheadAttention):
        return module, attr
    return module, "layer"


def projection_inputs(mha: nn.MultiheadAttention, kind: str, args, kwargs) -> list[torch.Tensor]:
    """The inputs of one of ``mha``'s projections in the call ``mha(*args, **kwargs)``, one per row block of its
    weight: ``kind`` "in_proj_weight" [query, key, value]; "q_proj_weight" / "k_proj_weight" / "v_proj_weight"
    [that one]; "out_proj" [the heads' output] (from :func:`attention_values`, which calls ``mha`` again: a hook
    that calls this must let that call through)."""
    if kind == "out_proj":
        return [attention_values(mha, args, kwargs)]
    qkv = [(args[i] if len(args) > i else kwargs[k]).detach() for i, k in enumerate(("query", "key", "value"))]
    return qkv if kind in ATTENTION_IN_PROJ else [qkv[ATTENTION_QKV_PROJ.index(kind)]]


class StackedProjections:
    """A SparseMultiheadAttention's ``in_proj_weight`` through the sparse layers' mask interface (``weight_shape``,
    ``values``, ``mask()``, ``set_mask()``): q_proj's, k_proj's and v_proj's rows stacked, as nn.MultiheadAttention
    stores them. What ``pysparse.retrain`` takes a mask keyed ``"<attn>.in_proj_weight"`` to."""

    def __init__(self, layers: list[SparseLinear]) -> None:
        self.layers = layers

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (sum(m.weight_shape[0] for m in self.layers), self.layers[0].weight_shape[1])

    @property
    def values(self) -> torch.Tensor:
        return self.layers[0].values

    def mask(self) -> torch.Tensor:
        return torch.cat([m.mask() for m in self.layers])

    def set_mask(self, mask: torch.Tensor) -> None:
        for layer, part in zip(self.layers, mask.split([m.weight_shape[0] for m in self.layers])):
            if not torch.equal(layer.mask(), part):
                layer.set_mask(part)


class SparseMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its projections as :class:`SparseLinear` layers: ``q_proj``, ``k_proj`` and
    ``v_proj`` (the three row blocks of ``in_proj_weight``, or ``q/k/v_proj_weight``) and ``out_proj``. The
    attention between them is torch's: ``F.scaled_dot_product_attention``, or with ``need_weights`` the explicit
    softmax, as nn.MultiheadAttention computes it (never its inference fast path, which reads dense weights).

    Same constructor arguments and forward (masks, ``batch_first``, ``add_bias_kv``, ``add_zero_attn``, kdim /
    vdim, ``need_weights``, ``average_attn_weights``, ``is_causal``, unbatched inputs) as nn.MultiheadAttention,
    plus ``sparsity`` (uniformly random masks, that fraction removed from each projection) or ``masks`` (bool,
    keyed by nn.MultiheadAttention's parameter names: ``"in_proj_weight"`` or ``"q_proj_weight"`` ..., and
    ``"out_proj.weight"``; a weight not named keeps everything). :meth:`from_dense` converts a trained one,
    :meth:`to_dense` converts back.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, *, sparsity: Optional[float] = None,
                 masks: Optional[Mapping[str, torch.Tensor]] = None, device=None, dtype=None) -> None:
        super().__init__()
        dense = nn.MultiheadAttention(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
                                      batch_first, device=device, dtype=dtype)
        if (sparsity is None) == (masks is None):
            raise ValueError("SparseMultiheadAttention needs either sparsity= (random masks) or masks= (a dict of "
                             "bool keep-masks by parameter name), not both and not neither")
        if sparsity is not None:
            masks = {n: random_mask(w.shape, sparsity, device=w.device) for n, w in projection_weights(dense).items()}
        self._build(dense, masks, keep_nonzeros=False)

    @classmethod
    def from_dense(cls, mha: nn.MultiheadAttention,
                   masks: Optional[Mapping[str, torch.Tensor]] = None) -> "SparseMultiheadAttention":
        """A SparseMultiheadAttention computing what ``mha`` computes with the weights ``masks`` keeps (keyed as
        :func:`projection_weights`; a weight not named, or masks None: its non-zeros)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_dense expects an nn.MultiheadAttention, got {type(mha).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._build(mha, masks or {}, keep_nonzeros=True)
        self.train(mha.training)
        return self

    def _build(self, mha: nn.MultiheadAttention, masks: Mapping[str, torch.Tensor], keep_nonzeros: bool) -> None:
        weights = projection_weights(mha)
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a dict of bool tensors by parameter name, got {type(masks).__name__}")
        unknown = sorted(set(masks) - set(weights))
        if unknown:
            raise ValueError(f"masks name {unknown}, which are not projection weights of this attention "
                             f"(it has {list(weights)})")
        full = {}
        for name, w in weights.items():
            refuse_meta(w, f"SparseMultiheadAttention ({name})")
            if name in masks:
                full[name] = check_mask(masks[name], w, name=f"masks[{name!r}]")
            else:
                full[name] = w.detach() != 0 if keep_nonzeros else torch.ones_like(w, dtype=torch.bool)
        self.embed_dim, self.kdim, self.vdim = mha.embed_dim, mha.kdim, mha.vdim
        self.num_heads, self.head_dim, self.dropout = mha.num_heads, mha.head_dim, mha.dropout
        self.batch_first, self.add_zero_attn = mha.batch_first, mha.add_zero_attn
        self.same_embed_dim = mha._qkv_same_embed_dim
        E = self.embed_dim
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.detach().chunk(3)
        for i, (p, fan_in) in enumerate(zip(_PROJECTIONS, (E, self.kdim, self.vdim))):
            if self.same_embed_dim:
                w, mask = mha.in_proj_weight[i * E:(i + 1) * E], full["in_proj_weight"][i * E:(i + 1) * E]
            else:
                w, mask = getattr(mha, f"{p}_weight"), full[f"{p}_weight"]
            dense = nn.Linear(fan_in, E, bias=biases[i] is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                dense.weight.copy_(w)
                dense.weight.requires_grad_(w.requires_grad)  # (a frozen attention stays frozen)
                if biases[i] is not None:
                    dense.bias.copy_(biases[i])
                    dense.bias.requires_grad_(mha.in_proj_bias.requires_grad)
            setattr(self, p, SparseLinear.from_dense(dense, mask))
        self.out_proj = SparseLinear.from_dense(mha.out_proj, full["out_proj.weight"])
        for b in ("bias_k", "bias_v"):
            t = getattr(mha, b)
            setattr(self, b, None if t is None else nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))

    # torch's fast paths (nn.TransformerEncoderLayer / nn.TransformerEncoder in eval mode) read these before they
    # read in_proj_weight: with _qkv_same_embed_dim False they take the layer's plain forward, which calls this
    # module (the fast path would call torch's fused dense attention on weights this module does not store).
    _qkv_same_embed_dim = False

    @property
    def in_proj_bias(self) -> Optional[torch.Tensor]:
        """The q, k and v biases stacked, as nn.MultiheadAttention's (None without bias)."""
        if self.q_proj.bias is None:
            return None
        return torch.cat([getattr(self, p).bias for p in _PROJECTIONS])

    @property
    def nnz(self) -> int:
        """The stored weights of the four projections."""
        return sum(m.nnz for m in self._layers())

    @property
    def sparsity(self) -> float:
        """The fraction of the four projections' dense weights that is not stored."""
        total = sum(math.prod(m.weight_shape) for m in self._layers())
        return 1.0 - self.nnz / total if total else 0.0

    def _layers(self) -> list[SparseLinear]:
        return [self.q_proj, self.k_proj, self.v_proj, self.out_proj]

    def in_projections(self) -> dict:
        """The in-projection by nn.MultiheadAttention's parameter name: ``in_proj_weight`` (a
        :class:`StackedProjections`) or ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` (the layers)."""
        if self.same_embed_dim:
            return {"in_proj_weight": StackedProjections([getattr(self, p) for p in _PROJECTIONS])}
        return {f"{p}_weight": getattr(self, p) for p in _PROJECTIONS}

    def masks(self) -> dict[str, torch.Tensor]:
        """The keep-masks, keyed by nn.MultiheadAttention's parameter names (as ``masks=`` takes them)."""
        return {**{n: p.mask() for n, p in self.in_projections().items()}, "out_proj.weight": self.out_proj.mask()}

    def to_dense(self) -> nn.MultiheadAttention:
        """An nn.MultiheadAttention with the same function (pruned weights are zeros)."""
        w = self.out_proj.values
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, bias=self.out_proj.bias is not None,
                                    add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn,
                                    kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first, device=w.device,
                                    dtype=w.dtype)
        with torch.no_grad():
            dense = [getattr(self, p).to_dense() for p in _PROJECTIONS]
            if self.same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat([d.weight for d in dense]))
            else:
                for p, d in zip(_PROJECTIONS, dense):
                    getattr(mha, f"{p}_weight").copy_(d.weight)
            if mha.in_proj_bias is not None:
                mha.in_proj_bias.copy_(torch.cat([d.bias for d in dense]))
            out = self.out_proj.to_dense()
            mha.out_proj.weight.copy_(out.weight)
            if out.bias is not None:
                mha.out_proj.bias.copy_(out.bias)
            for b in ("bias_k", "bias_v"):
                if getattr(self, b) is not None:
                    getattr(mha, b).copy_(getattr(self, b))
        mha.train(self.training)
        return mha

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if isinstance(query, torch.fx.Proxy) or isinstance(key, torch.fx.Proxy) or isinstance(value, torch.fx.Proxy):
            return traced_call(self, (query, key, value), dict(
                key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
                average_attn_weights=average_attn_weights, is_causal=is_causal))
        # The checks and mask rules are nn.MultiheadAttention's (F.multi_head_attention_forward), the same
        # exceptions for the same mistakes; the projections are computed in the inputs' own layout.
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        elif key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        seq_first = is_batched and not self.batch_first  # [L, N, E] (else [N, L, E])
        E, H, D = self.embed_dim, self.num_heads, self.head_dim
        if query.shape[-1] != E:
            raise AssertionError(f"was expecting embedding dimension of {E}, but got {query.shape[-1]}")
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                 f"{value.shape[:2]}")
        # Projections, then [N, L, E] (batch first) and contiguous: a SparseLinear's output is a transposed view
        # (features the slowest dimension), and scaled_dot_product_attention takes its fused CPU kernel only for
        # operands whose head dimension is contiguous (else its math path: ViT-B/16's shape, 197 tokens, batch 1
        # / 8, the copies and the fused kernel take 0.69 / 0.61 of the math path's time).
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if seq_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        N, L, S = q.shape[0], q.shape[1], k.shape[1]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (L, S):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(L, S)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (N * H, L, S):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(N * H, L, S)}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.bias_k is not None:  # one more key and value, learned
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.reshape(N, L, H, D).transpose(1, 2)  # [N, H, L, D]
        k = k.reshape(N, -1, H, D).transpose(1, 2)
        v = v.reshape(N, -1, H, D).transpose(1, 2)
        if self.add_zero_attn:  # and one more, zeros
            zeros = k.new_zeros(N, H, 1, D)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        S = k.shape[2]
        if attn_mask is not None:  # [1 or N * H, L, S] -> [1 or N, 1 or H, L, S]
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 else attn_mask.view(N, H, L, S)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (N, S):
                raise AssertionError(f"Expected key_padded_mask.shape to be {(N, S)}, got "
                                     f"{tuple(key_padding_mask.shape)}")
            key_padding_mask = key_padding_mask.view(N, 1, 1, S)
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / D)) @ k.transpose(-2, -1)
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        # [N, H, L, D] -> the input's layout, then the output projection
        out = out.permute(2, 0, 1, 3).reshape(L, N, E) if seq_first else out.transpose(1, 2).reshape(N, L, E)
        out = self.out_proj(out)
        return (out if is_batched else out.squeeze(0)), weights

    def _split_in_projection(self, state_dict, prefix: str, key: str, part: str, error_msgs: list) -> None:
        """``state_dict[key]`` (q, k and v stacked in 3 x embed_dim rows) handed to the three projections as their
        ``part`` ("weight" / "bias"); any other number of rows is a size mismatch."""
        t, E = state_dict.pop(key), self.embed_dim
        if t.shape[:1] != (3 * E,):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(t.shape)} from checkpoint, "
                              f"the in-projection's {part} of this SparseMultiheadAttention has {3 * E} rows.")
            return
        for p, chunk in zip(_PROJECTIONS, t.split(E)):
            state_dict[prefix + f"{p}.{part}"] = chunk

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # An nn.MultiheadAttention's state dict: its in-projection (``in_proj_weight`` / ``q_proj_weight`` ...
        # and ``in_proj_bias``) handed to the three projections as dense Linear entries, which SparseLinear loads
        # at its stored places (``out_proj.weight`` / ``.bias`` already are); the keys are renamed in torch's copy
        # of the state dict, before the children load from it.
        if not any(prefix + f"{p}.values" in state_dict for p in _PROJECTIONS):
            weight, bias = prefix + "in_proj_weight", prefix + "in_proj_bias"
            if self.same_embed_dim and isinstance(state_dict.get(weight), torch.Tensor):
                self._split_in_projection(state_dict, prefix, weight, "weight", error_msgs)
            elif not self.same_embed_dim:
                for p in _PROJECTIONS:
                    if prefix + f"{p}_weight" in state_dict:
                        state_dict[prefix + f"{p}.weight"] = state_dict.pop(prefix + f"{p}_weight")
            if isinstance(state_dict.get(bias), torch.Tensor) and self.q_proj.bias is not None:
                self._split_in_projection(state_dict, prefix, bias, "bias", error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"nnz={self.nnz}, sparsity={self.sparsity:.4f}")

"""SparseMultiheadAttention against nn.MultiheadAttention with the same masked weights, and attention in
prune / sparsify / densify / save / load."""
import copy
import itertools
import os

import pytest
import torch
from torch import nn

import pysparse
from pysparse import SparseLinear, SparseMultiheadAttention
from pysparse.nn.attention import projection_weights
from pysparse.testing import DEVICES


def _masked_pair(seed=0, sparsity=0.7, device="cpu", **kwargs):
    """(dense, sparse, masks): an nn.MultiheadAttention with random biases and its masked weights zeroed, and
    the SparseMultiheadAttention of the same masks."""
    torch.manual_seed(seed)
    dense = nn.MultiheadAttention(16, 4, device=device, **kwargs)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if "bias" in name:
                p.normal_()
    masks = {n: torch.rand(w.shape, device=device) >= sparsity for n, w in projection_weights(dense).items()}
    with torch.no_grad():
        for n, m in masks.items():
            dense.get_parameter(n).mul_(m)
    return dense, SparseMultiheadAttention.from_dense(dense, masks), masks


def _inputs(batched, batch_first, kdim, L=5, S=7, N=3, device="cpu", requires_grad=True):
    def make(seq, dim):
        shape = (seq, dim) if not batched else ((N, seq, dim) if batch_first else (seq, N, dim))
        return torch.randn(shape, device=device, requires_grad=requires_grad)
    return make(L, 16), make(S, kdim), make(S, kdim)


def _run(module, q, k, v, **kwargs):
    """Output, attention weights and the gradients of the inputs and of the four projections' weights."""
    for t in (q, k, v):
        t.grad = None
    out, weights = module(q, k, v, **kwargs)
    (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    if isinstance(module, SparseMultiheadAttention):
        grads += [_dense_grad(m) for m in module._layers()]
    else:
        w = dict(projection_weights(module))
        if "in_proj_weight" in w:
            g = w["in_proj_weight"].grad
            grads += list(g.chunk(3))
        else:
            grads += [w[f"{p}_proj_weight"].grad for p in "qkv"]
        grads.append(w["out_proj.weight"].grad)
    for p in module.parameters():
        p.grad = None
    return out.detach(), weights, grads


def _dense_grad(layer: SparseLinear) -> torch.Tensor:
    """The values' gradient written out at the kept places of the dense weight (zeros elsewhere)."""
    return torch.zeros(layer.weight_shape, device=layer.values.device).index_put_(
        tuple(layer.mask().nonzero().t()), layer.values.grad)


def _masks_for(batched, N, L, S, kind, device="cpu"):
    """(key_padding_mask, attn_mask) of one kind: none, bool padding, bool attention, both, float attention,
    float both, a 3-D per-head bool attention mask."""
    g = torch.Generator().manual_seed(1)
    kpm = torch.rand((S,) if not batched else (N, S), generator=g) > 0.7
    am = torch.rand(L, S, generator=g) > 0.7
    kpm[..., 0] = False  # every query keeps one key
    am[:, 0] = False
    to_float = lambda m: torch.zeros(m.shape).masked_fill(m, float("-inf"))  # noqa: E731
    table = {"none": (None, None), "kpm": (kpm, None), "attn": (None, am), "both": (kpm, am),
             "float": (None, to_float(am)), "float_both": (to_float(kpm), to_float(am)),
             "attn3d": (None, (torch.rand(N * 4, L, S, generator=g) > 0.7).index_fill_(2, torch.tensor([0]), False))}
    return tuple(None if m is None else m.to(device) for m in table[kind])


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _kept(masks):
    """The four projections' masks in _run's order: q, k, v (in_proj_weight's three blocks), out_proj."""
    qkv = list(masks["in_proj_weight"].chunk(3)) if "in_proj_weight" in masks else \
        [masks[f"{p}_proj_weight"] for p in "qkv"]
    return qkv + [masks["out_proj.weight"]]


def _compare(dense, sparse, q, k, v, **kwargs):
    """Outputs, attention weights, input gradients and (at the kept places) the weights' gradients agree."""
    (o1, w1, g1), (o2, w2, g2) = _run(dense, q, k, v, **kwargs), _run(sparse, q, k, v, **kwargs)
    g1 = g1[:3] + [g * m for g, m in zip(g1[3:], _kept(sparse.masks()))]
    assert o2.shape == o1.shape
    _close(o2, o1)
    assert (w1 is None) == (w2 is None)
    if w1 is not None:
        _close(w2, w1)
    for a, b in zip(g2, g1):
        _close(a, b)


@pytest.mark.parametrize("batch_first,bias,add_bias_kv,add_zero_attn,kdim",
                         [(bf, b, kv, z, kd) for bf, b, kv, z, kd in
                          itertools.product([False, True], [True, False], [False, True], [False, True], [None, 5])
                          if (b or not kv)])  # (add_bias_kv needs no in_proj_bias; keep the grid small)
def test_matches_nn_multihead_attention(batch_first, bias, add_bias_kv, add_zero_attn, kdim):
    dense, sparse, _ = _masked_pair(bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, kdim=kdim,
                                    vdim=kdim, batch_first=batch_first)
    for batched, kind in itertools.product([True, False], ["none", "kpm", "attn", "both", "float", "float_both"]):
        q, k, v = _inputs(batched, batch_first, kdim or 16)
        kpm, am = _masks_for(batched, 3, 5, 7, kind)
        for need_weights, average in [(True, True), (True, False), (False, True)]:
            _compare(dense, sparse, q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights,
                     average_attn_weights=average)


@pytest.mark.parametrize("device", DEVICES)
def test_self_attention_3d_masks_and_causal(device):
    dense, sparse, _ = _masked_pair(batch_first=True, device=device)
    x = torch.randn(3, 6, 16, device=device, requires_grad=True)
    _, am3 = _masks_for(True, 3, 6, 6, "attn3d", device)
    _compare(dense, sparse, x, x, x, attn_mask=am3)
    causal = nn.Transformer.generate_square_subsequent_mask(6, device=device)
    for need_weights in (True, False):
        _compare(dense, sparse, x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
    kpm, _ = _masks_for(True, 3, 6, 6, "kpm", device)
    _compare(dense, sparse, x, x, x, attn_mask=causal, is_causal=True, key_padding_mask=kpm.float()
             .masked_fill(kpm, float("-inf")), need_weights=False)


def test_dropout_draws_as_nn_multihead_attention():
    """In training, with need_weights=False both call scaled_dot_product_attention on [N, H, L, D] operands:
    the same seed drops the same weights."""
    dense, sparse, _ = _masked_pair(dropout=0.5, batch_first=True)
    dense.train(), sparse.train()
    x = torch.randn(2, 6, 16)
    outs = []
    for m in (dense, sparse):
        torch.manual_seed(3)
        outs.append(m(x, x, x, need_weights=False)[0])
    _close(outs[1], outs[0])
    sparse.eval()
    assert not torch.equal(sparse(x, x, x)[0], outs[1])


def test_errors_and_shapes_are_nn_multihead_attention_s():
    dense, sparse, _ = _masked_pair()
    q = torch.randn(5, 3, 16)
    for module in (dense, sparse):
        with pytest.raises(RuntimeError, match="Need attn_mask"):
            module(q, q, q, is_causal=True)
        with pytest.raises(RuntimeError, match="2D attn_mask"):
            module(q, q, q, attn_mask=torch.zeros(4, 5, dtype=torch.bool))
        with pytest.raises(AssertionError):
            module(q, q, torch.randn(4, 3, 16))


def test_construction_and_conversion():
    dense, sparse, masks = _masked_pair()
    assert sparse.nnz == sum(int(m.sum()) for m in masks.values())
    for name, m in sparse.masks().items():
        assert torch.equal(m, masks[name])
    back = sparse.to_dense()
    assert type(back) is nn.MultiheadAttention
    for name, p in dense.named_parameters():
        torch.testing.assert_close(back.get_parameter(name), p)
    # masks=None keeps the non-zeros; a frozen attention stays frozen
    assert SparseMultiheadAttention.from_dense(dense).nnz == sparse.nnz
    frozen = SparseMultiheadAttention.from_dense(copy.deepcopy(dense).requires_grad_(False))
    assert not any(p.requires_grad for p in frozen.parameters())
    layer = SparseMultiheadAttention(32, 4, sparsity=0.9, batch_first=True)
    assert layer.sparsity == pytest.approx(0.9, abs=1e-3)
    assert layer(torch.randn(2, 3, 32), torch.randn(2, 3, 32), torch.randn(2, 3, 32))[0].shape == (2, 3, 32)
    separate = SparseMultiheadAttention(8, 2, kdim=3, vdim=5,
                                        masks={"k_proj_weight": torch.ones(8, 3, dtype=torch.bool)})
    assert set(separate.masks()) == {"q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"}


def test_bad_input_names_the_argument():
    dense = nn.MultiheadAttention(8, 2)
    with pytest.raises(ValueError, match="either sparsity= .* or masks="):
        SparseMultiheadAttention(8, 2)
    with pytest.raises(ValueError, match="either sparsity="):
        SparseMultiheadAttention(8, 2, sparsity=0.5, masks={})
    with pytest.raises(ValueError, match="sparsity"):
        SparseMultiheadAttention(8, 2, sparsity=1.0)
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        SparseMultiheadAttention.from_dense(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="q_proj_weight"):
        SparseMultiheadAttention.from_dense(dense, {"q_proj_weight": torch.ones(8, 8, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"masks\['in_proj_weight'\] has shape"):
        SparseMultiheadAttention.from_dense(dense, {"in_proj_weight": torch.ones(8, 8, dtype=torch.bool)})
    with pytest.raises(TypeError, match=r"masks\['out_proj.weight'\] must be a bool"):
        SparseMultiheadAttention.from_dense(dense, {"out_proj.weight": torch.ones(8, 8)})
    with pytest.raises(ValueError, match="SparseMultiheadAttention.from_dense"):
        pysparse.sparsify(dense)


def test_trains_its_kept_weights_only():
    _, sparse, masks = _masked_pair(batch_first=True)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    x = torch.randn(4, 5, 16)
    before = sparse.to_dense().in_proj_weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        sparse(x, x, x, need_weights=False)[0].pow(2).mean().backward()
        opt.step()
    after = sparse.to_dense().in_proj_weight.detach()
    assert not torch.equal(after, before)
    assert not after[~masks["in_proj_weight"]].any()


def _encoder(seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(32, 5))


def test_prune_scores_the_in_projection():
    model = _encoder()
    result = pysparse.prune(model, "magnitude", sparsity=0.8, scope="layer")
    name = "0.layers.0.self_attn.in_proj_weight"
    assert name in result.masks and result.kinds[name] == "MultiheadAttention"
    assert result.masks[name].float().mean().item() == pytest.approx(0.2, abs=1e-3)
    assert not model.get_parameter(name)[~result.masks[name]].any()
    rows = result.table().splitlines()  # columns as wide as "NonDynamicallyQuantizableLinear" (out_proj's kind)
    assert len({len(r) for r in rows}) == 1 and "MultiheadAttention" in rows[1]
    excluded = pysparse.prune(_encoder(), "magnitude", sparsity=0.8, exclude=[nn.MultiheadAttention])
    assert not any("in_proj" in n for n in excluded.masks)


def test_wanda_scales_each_block_of_the_in_projection_by_its_own_input():
    torch.manual_seed(0)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, 2 * x, 5 * x)[0]

    model = Cross()
    x = torch.randn(4, 6, 8)
    result = pysparse.prune(model, "wanda", sparsity=0.5, data=[(x, None)], apply=False)
    w = model.attn.in_proj_weight.detach()
    norms = x.pow(2).reshape(-1, 8).sum(0).sqrt()
    expected = torch.cat([w[:8].abs() * norms, w[8:16].abs() * 2 * norms, w[16:].abs() * 5 * norms])
    torch.testing.assert_close(result.scores["attn.in_proj_weight"], expected, rtol=1e-5, atol=1e-6)
    # out_proj (never called: the attention reads its weight) by the norms of its input, the heads' output
    captured = []
    model.attn.out_proj.register_forward_hook(lambda m, a, o: captured.append(a[0]))
    probe = SparseMultiheadAttention.from_dense(model.attn)
    probe.out_proj.register_forward_hook(lambda m, a, o: captured.append(a[0]))
    probe(x, 2 * x, 5 * x)
    values = captured[-1].reshape(-1, 8)
    expected = model.attn.out_proj.weight.detach().abs() * values.pow(2).sum(0).sqrt()
    torch.testing.assert_close(result.scores["attn.out_proj.weight"], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_sparsify_a_transformer_matches_the_masked_dense(train, tmp_path):
    model = _encoder()
    masks = pysparse.prune(model, "magnitude", sparsity=0.9, scope="layer").masks
    dense = copy.deepcopy(model).train(train)
    pysparse.sparsify(model, masks).train(train)
    attn = [m for m in model.modules() if isinstance(m, SparseMultiheadAttention)]
    assert len(attn) == 2 and not any(type(m) is nn.MultiheadAttention for m in model.modules())
    x = torch.randn(3, 7, 32, requires_grad=True)
    with torch.set_grad_enabled(train):  # eval + no_grad: the encoder's fast path, declined by the sparse attention
        ref, out = dense(x), model(x)
    _close(out, ref)
    path = os.path.join(tmp_path, "t.safetensors")
    pysparse.save(model, path)
    fresh = pysparse.load(path, _encoder(seed=1).train(train))
    assert sum(isinstance(m, SparseMultiheadAttention) for m in fresh.modules()) == 2
    with torch.set_grad_enabled(train):
        _close(fresh(x), ref)
    pysparse.densify(fresh)
    assert sum(type(m) is nn.MultiheadAttention for m in fresh.modules()) == 2
    assert not any(isinstance(m, (SparseLinear, SparseMultiheadAttention)) for m in fresh.modules())
    with torch.set_grad_enabled(train):
        _close(fresh(x), ref)
    clone = copy.deepcopy(model)
    clone.load_state_dict(model.state_dict())
    with torch.set_grad_enabled(train):
        _close(clone(x), ref)


@pytest.mark.parametrize("kdim", [None, 12])
def test_loads_an_nn_multihead_attention_state_dict(kdim):
    """A dense attention's state dict (in_proj_weight or q/k/v_proj_weight, in_proj_bias, out_proj) loads into
    a SparseMultiheadAttention at its stored places; a sparsified encoder loads the dense encoder's checkpoint."""
    dense, sparse, masks = _masked_pair(seed=3, kdim=kdim, vdim=kdim, add_bias_kv=True)
    fresh = SparseMultiheadAttention(16, 4, kdim=kdim, vdim=kdim, add_bias_kv=True, masks=masks)
    unmasked = {k: v + 1 for k, v in dense.state_dict().items()}  # non-zeros at the pruned places too
    fresh.load_state_dict(unmasked)
    with torch.no_grad():
        dense.load_state_dict(unmasked)
        for n, m in masks.items():
            dense.get_parameter(n).mul_(m)
    q, k, v = _inputs(True, False, kdim or 16)
    _close(fresh(q, k, v)[0], dense(q, k, v)[0])
    bad = dict(unmasked, in_proj_bias=torch.zeros(47))
    with pytest.raises(RuntimeError, match=r"size mismatch for in_proj_bias: .*\(47,\).*bias .* 48 rows"):
        fresh.load_state_dict(bad)
    if kdim is None:
        with pytest.raises(RuntimeError, match=r"size mismatch for in_proj_weight: .*\(32, 16\).*weight .* 48 rows"):
            fresh.load_state_dict(dict(unmasked, in_proj_weight=torch.zeros(32, 16)))
    model = _encoder()
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    masks = pysparse.prune(model, "magnitude", sparsity=0.9, scope="layer").masks
    pysparse.sparsify(model, masks)
    assert sum(isinstance(m, SparseMultiheadAttention) for m in model.modules()) == 2
    model.load_state_dict(checkpoint)
    ref = _encoder()
    ref.load_state_dict(checkpoint)
    with torch.no_grad():
        for n, m in masks.items():
            ref.get_parameter(n).mul_(m)
    x = torch.randn(3, 7, 32)
    _close(model(x), ref(x))


def test_sparsify_leaves_attention_below_the_crossover_dense_with_its_masks_applied():
    model = _encoder()
    masks = pysparse.prune(model, "magnitude", sparsity=0.3, scope="layer").masks
    before = model[0].layers[0].self_attn.in_proj_weight.detach().clone()
    pysparse.sparsify(model, {k: v for k, v in masks.items() if "self_attn" in k}, min_sparsity=0.5)
    attn = model[0].layers[0].self_attn
    assert type(attn) is nn.MultiheadAttention
    assert torch.equal(attn.in_proj_weight.detach(), before * masks["0.layers.0.self_attn.in_proj_weight"])
    # masks=None: by the zeros; min_sparsity=0 converts
    pysparse.sparsify(model, min_sparsity=0.0)
    assert sum(isinstance(m, SparseMultiheadAttention) for m in model.modules()) == 2


def _heads_output(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """The input of attn.out_proj in attn(x, x, x): through a SparseMultiheadAttention of the same weights."""
    probe = SparseMultiheadAttention.from_dense(attn, {n: torch.ones_like(w, dtype=torch.bool)
                                                       for n, w in projection_weights(attn).items()}).eval()
    seen = []
    probe.out_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        probe(x, x, x, need_weights=False)
    return seen[0].double()


def test_prune_with_compensate_refits_the_attention_projections():
    """Layer-wise OBS on an attention: the in-projection's three row blocks each refit on their own input (here
    all the block's input x, the attention comes first), out_proj on the heads' output (the pruned model's
    against the dense model's); the reported errors are those of the weights written back."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0])

    model = Net().eval()
    dense = copy.deepcopy(model)
    x = torch.randn(64, 6, 6) @ torch.randn(6, 16) + 0.1 * torch.randn(64, 6, 16)  # correlated features
    result = pysparse.prune(model, "magnitude", sparsity=0.5, scope="layer", data=[(x, None)], compensate=True)
    rec = result.reconstruction
    assert set(rec) == {"attn.in_proj_weight", "attn.out_proj.weight", "head.weight"}
    for r in rec.values():
        assert r["compensated"] < 0.9 * r["masked"]
    w, wd = model.attn.in_proj_weight.detach().double(), dense.attn.in_proj_weight.detach().double()
    assert not w[~result.masks["attn.in_proj_weight"]].any()
    xs = x.reshape(-1, 16).double()
    error = sum((xs @ (w - wd)[b * 16:(b + 1) * 16].t()).pow(2).sum() for b in range(3)) / (xs @ wd.t()).pow(2).sum()
    assert float(error) == pytest.approx(rec["attn.in_proj_weight"]["compensated"], rel=1e-6)
    # out_proj: its input in the model as pruned so far (in_proj refitted) against the dense model's
    heads, heads_dense = _heads_output(model.attn, x), _heads_output(dense.attn, x)
    o, od = model.attn.out_proj.weight.detach().double(), dense.attn.out_proj.weight.detach().double()
    error = (heads @ o.t() - heads_dense @ od.t()).pow(2).sum() / (heads_dense @ od.t()).pow(2).sum()
    assert float(error) == pytest.approx(rec["attn.out_proj.weight"]["compensated"], rel=1e-4)


def test_retrain_takes_prune_s_masks_on_a_sparsified_transformer():
    """Masks keyed by nn.MultiheadAttention's names (in_proj_weight, out_proj.weight) become the sparse
    attention's structure; connectivity correction trains only the kept weights."""
    model = _encoder()
    first = pysparse.prune(model, "magnitude", sparsity=0.5, scope="layer").masks
    pysparse.sparsify(model, first, min_sparsity=0.0)
    dense = pysparse.densify(copy.deepcopy(model))
    second = pysparse.prune(dense, "magnitude", sparsity=0.8, scope="layer").masks
    data = [(torch.randn(8, 7, 32), torch.randint(0, 5, (8, 7))) for _ in range(2)]
    loss = lambda out, y: nn.functional.cross_entropy(out.reshape(-1, 5), y.reshape(-1))  # noqa: E731
    pysparse.retrain(model, second, "connectivity", data, epochs=1, lr=0.01, loss_fn=loss)
    attn = model[0].layers[0].self_attn
    assert isinstance(attn, SparseMultiheadAttention)
    for key in ("in_proj_weight", "out_proj.weight"):
        assert torch.equal(attn.masks()[key], second[f"0.layers.0.self_attn.{key}"])
    with pytest.raises(ValueError, match="connectivity"):
        pysparse.retrain(model, second, "weight", data, epochs=1, lr=0.01, method="magnitude", sparsity=0.8,
                         loss_fn=loss)


class _SelfAttention(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_compiles_fullgraph():
    from pysparse.testing import assert_compiled_matches_eager

    _, sparse, _ = _masked_pair(batch_first=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    assert_compiled_matches_eager(_SelfAttention(sparse), x, torch.randn(2, 5, 16))


@pytest.mark.parametrize("train", [False, True])
def test_sparsify_an_encoder_decoder_transformer(train):
    """nn.Transformer: self-attention (causal in the decoder) and cross-attention (query from the decoder, key and
    value from the encoder's memory) all become SparseMultiheadAttention and compute the masked model."""
    torch.manual_seed(0)
    model = nn.Transformer(32, 4, 2, 2, 64, dropout=0.0, batch_first=True)
    masks = pysparse.prune(model, "magnitude", sparsity=0.9, scope="layer").masks
    dense = copy.deepcopy(model).train(train)
    pysparse.sparsify(model, masks).train(train)
    assert sum(isinstance(m, SparseMultiheadAttention) for m in model.modules()) == 6
    src, tgt = torch.randn(2, 9, 32), torch.randn(2, 5, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.set_grad_enabled(train):
        _close(model(src, tgt, tgt_mask=causal, tgt_is_causal=True),
               dense(src, tgt, tgt_mask=causal, tgt_is_causal=True))


def test_autocast_computes_as_nn_multihead_attention():
    dense, sparse, _ = _masked_pair(batch_first=True)
    x = torch.randn(2, 7, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = dense(x, x, x, need_weights=False)[0], sparse(x, x, x, need_weights=False)[0]
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_sparsify_checks_every_mask_before_it_converts_an_attention():
    model = _encoder()
    masks = pysparse.prune(model, "magnitude", sparsity=0.9, scope="layer").masks
    masks["0.layers.0.linear1.weight"] = masks["0.layers.0.linear1.weight"][:3]
    with pytest.raises(ValueError, match=r"masks\['0.layers.0.linear1.weight'\] has shape"):
        pysparse.sparsify(model, masks)
    assert not any(isinstance(m, (SparseLinear, SparseMultiheadAttention)) for m in model.modules())
    bad = {"0.layers.1.self_attn.in_proj_weight": torch.ones(3, 3, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"masks\['0.layers.1.self_attn.in_proj_weight'\] has shape"):
        pysparse.sparsify(model, bad)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # (the dense model's nested path)
def test_a_transformer_encoder_s_nested_tensor_path_is_declined(tmp_path):
    """nn.TransformerEncoder (enable_nested_tensor, the default) in inference with a padding mask turns its input
    into a nested tensor and reads self_attn.in_proj_weight: after sparsify (and load) it takes the plain path, as
    its constructor decides for sparse attention, and gives the dense model's outputs at the positions kept."""
    torch.manual_seed(0)
    make = lambda: nn.TransformerEncoder(  # noqa: E731
        nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2).eval()
    model = make()
    masks = pysparse.prune(model, "magnitude", sparsity=0.9, scope="layer").masks
    dense = copy.deepcopy(model)
    pysparse.sparsify(model, masks)
    assert model.use_nested_tensor is False
    x = torch.randn(3, 7, 32)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    with torch.no_grad():
        want = dense(x, src_key_padding_mask=kpm)  # nested: zeros at the padded positions
        _close(model(x, src_key_padding_mask=kpm)[~kpm], want[~kpm])
    pysparse.save(model, tmp_path / "enc.safetensors")
    loaded = pysparse.load(tmp_path / "enc.safetensors", make())
    assert loaded.use_nested_tensor is False
    with torch.no_grad():
        _close(loaded(x, src_key_padding_mask=kpm)[~kpm], want[~kpm])


def test_compensate_handles_cross_attention_and_separate_projections():
    """The decoder's cross-attention (queries of 5 positions, keys and values of 9) and an attention with
    kdim / vdim (q_proj_weight, k_proj_weight, v_proj_weight) refit too; the error never grows."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True)
            self.cross = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)

        def forward(self, x):
            y = self.t(x, x[:, :5])
            return self.cross(y, x[..., :8], x[..., 8:])[0]

    model = Net().eval()
    x = torch.randn(32, 9, 4) @ torch.randn(4, 16) + 0.1 * torch.randn(32, 9, 16)
    result = pysparse.prune(model, "magnitude", sparsity=0.5, scope="layer", data=[(x, None)], compensate=True)
    rec = result.reconstruction
    for name in ("t.decoder.layers.0.multihead_attn.in_proj_weight", "cross.q_proj_weight", "cross.k_proj_weight",
                 "cross.v_proj_weight", "cross.out_proj.weight"):
        assert rec[name]["compensated"] <= rec[name]["masked"] * (1 + 1e-9), name
    assert set(rec) == set(result.masks)
    for name, mask in result.masks.items():
        assert not model.get_parameter(name)[~mask].any()


def test_save_load_densify_an_attention_with_kdim_vdim_and_extra_keys(tmp_path):
    """Separate q / k / v weights (kdim, vdim), add_bias_kv and add_zero_attn survive save, load into a dense
    model and densify."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.MultiheadAttention(16, 2, kdim=8, vdim=6, add_bias_kv=True, add_zero_attn=True)

        def forward(self, x):
            return self.a(x, x[..., :8], x[..., :6])[0]

    torch.manual_seed(0)
    model = Net()
    masks = pysparse.prune(model, "magnitude", sparsity=0.7, scope="layer").masks
    assert sorted(masks) == ["a.k_proj_weight", "a.out_proj.weight", "a.q_proj_weight", "a.v_proj_weight"]
    pysparse.sparsify(model, masks)
    x = torch.randn(5, 2, 16)
    with torch.no_grad():
        want = model(x)
        pysparse.save(model, tmp_path / "a.safetensors")
        loaded = pysparse.load(tmp_path / "a.safetensors", Net())
        assert isinstance(loaded.a, SparseMultiheadAttention)
        for key, mask in masks.items():
            assert torch.equal(loaded.a.masks()[key[2:]], mask)
        _close(loaded(x), want)
        pysparse.densify(loaded)
        assert type(loaded.a) is nn.MultiheadAttention
        _close(loaded(x), want)

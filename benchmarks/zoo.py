"""Drop-in check over torchvision's classification families: each model (random weights) pruned by magnitude
layer by layer and sparsified as `models.py` does it, then, against the same pruned model left dense: the eval
forward, the input gradient (eval), the train-mode forward (dropout off: a sparse layer's output is a
transposed view, so the same seed drops other elements), `pysparse.save` / `pysparse.load` into a freshly built
model (its outputs against the sparse one's), `pysparse.densify`, and torchvision's `create_feature_extractor`
(torch.fx) on the sparse model. One line per model: the largest relative
error of each check (``max |a - b| / max |b|``), ok under 1e-3 (the input gradient in norm, against the dense
model's in float64, beside the dense float32 one's error: ok under twice that), the saved file against the dense float32
weights; a model that raises is reported with its error and the sweep goes on. Correctness, not speed
(`models.py` times them).

    python benchmarks/zoo.py                          # one model per family (about 8 minutes on 2 cores)
    python benchmarks/zoo.py --model mnasnet0_5 swin_v2_t --sparsity 0.95
"""
import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import pysparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import pruned_pair  # noqa: E402

# One per family; the input size each needs (ViT / MaxViT fix theirs, Inception's train-mode auxiliary head
# needs 299, the rest take small images)
FAMILIES = {
    "alexnet": 64, "squeezenet1_0": 64, "shufflenet_v2_x0_5": 64, "mnasnet0_5": 64, "mobilenet_v2": 64,
    "mobilenet_v3_large": 64, "efficientnet_b0": 64, "efficientnet_v2_s": 64, "regnet_x_400mf": 64,
    "regnet_y_400mf": 64, "densenet121": 64, "googlenet": 96, "inception_v3": 299, "resnext50_32x4d": 64,
    "wide_resnet50_2": 64, "convnext_tiny": 64, "swin_t": 224, "swin_v2_t": 224, "maxvit_t": 224,
    "vit_b_32": 224, "vgg11_bn": 64,
}
CHECKS = ("eval", "input_grad", "train", "load", "densify", "fx")
TOLERANCE = 1e-3


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # GoogLeNet / Inception in train mode: (logits, aux...)


def _error(a, b) -> float:
    a, b = _first(a), _first(b)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check(model: str, sparsity: float = 0.9, image: int = 64, batch: int = 2, seed: int = 0) -> dict:
    """{check: relative error} for one torchvision model, plus ``layers`` (sparse layers) and ``file`` (the
    saved file / the dense float32 weights)."""
    import torchvision

    dense, sparse, layers = pruned_pair(model, sparsity, seed)
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, image, image)
    out = {"layers": layers}
    dense.eval()
    sparse.eval()
    with torch.no_grad():
        out["eval"] = _error(sparse(x), dense(x))
    # The input gradient against the dense model's in float64: a deep network with random weights can have an
    # input gradient that float32 does not resolve (Inception-v3's: dense float32 off by 1.4x its largest element),
    # so the sparse model's may miss it by as much as the dense float32 one does, not more than twice that.
    grads = {}
    for name, net, dtype in (("sparse", sparse, torch.float32), ("dense", dense, torch.float32),
                             ("float64", copy.deepcopy(dense).double(), torch.float64)):
        xx = x.detach().to(dtype).clone().requires_grad_()
        y = _first(net(xx))
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(dtype))
        grads[name] = xx.grad.double()
    # In norm: max-pooling routes the gradient to the largest input, and where two nearly tie float32's rounding
    # (the dense model's as the sparse one's, each its own) picks either: single elements differ wholly.
    norm = lambda a: float((a - grads["float64"]).norm() / grads["float64"].norm().clamp_min(1e-300))  # noqa: E731
    out["input_grad"], out["input_grad_dense"] = norm(grads["sparse"]), norm(grads["dense"])
    for net in (dense, sparse):
        net.train()
        for m in net.modules():
            if isinstance(m, torch.nn.modules.dropout._DropoutNd):
                m.eval()
            elif isinstance(m, torchvision.ops.StochasticDepth):  # (it drops whole samples in training)
                m.p = 0.0
    out["train"] = _error(sparse(x), dense(x))
    sparse.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        pysparse.save(sparse, path)
        out["file"] = os.path.getsize(path) / sum(p.numel() * 4 for p in dense.parameters())
        loaded = pysparse.load(path, torchvision.models.get_model(model).eval())
    with torch.no_grad():
        ref = sparse(x)
        out["load"] = _error(loaded(x), ref)
        out["densify"] = _error(pysparse.densify(copy.deepcopy(sparse))(x), ref)
    # torch.fx, through torchvision's feature extractor: the model's last node, from the traced sparse model
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    last = get_graph_node_names(sparse)[1][-1]
    extractor = create_feature_extractor(sparse, [last]).eval()
    with torch.no_grad():
        out["fx"] = _error(extractor(x)[last], ref)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=list(FAMILIES))
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args(argv)
    print(f"torchvision models pruned to {args.sparsity:.0%} and sparsified, against the pruned model dense "
          f"(relative error; ok < {TOLERANCE:g})")
    failed = 0
    for model in args.model:
        start = time.perf_counter()
        try:
            r = check(model, args.sparsity, FAMILIES.get(model, 224))
        except Exception as exc:  # report and go on: the sweep is for finding these
            failed += 1
            print(f"{model:20s} FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        bad = [c for c in CHECKS if not r[c] < (max(TOLERANCE, 2 * r["input_grad_dense"]) if c == "input_grad"
                                                 else TOLERANCE)]
        failed += bool(bad)
        errors = " ".join(f"{c} {r[c]:.1e}" for c in CHECKS).replace(
            "input_grad", "input_grad (float64)").replace(" train", f" (dense {r['input_grad_dense']:.1e}) train")
        print(f"{model:20s} {r['layers']:4d} sparse layers  {errors}  file {r['file']:.3f}  "
              f"{'MISMATCH: ' + ', '.join(bad) if bad else 'ok'} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"{len(args.model) - failed} of {len(args.model)} models ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

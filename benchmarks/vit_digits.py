"""A small vision transformer (torchvision's VisionTransformer: 2x2 patches of the 8x8 digits, 16 tokens) trained
on scikit-learn's bundled digits, then pruned one-shot by magnitude and by wanda, layer by layer, with and
without `compensate=True` (layer-wise OBS: each row block of an attention's in_proj_weight refit on its own
input, out_proj on the heads' output), its attention included; test accuracy of each, and of the model
sparsified (`pysparse.sparsify`, SparseMultiheadAttention) with its saved file's size.

    python benchmarks/vit_digits.py                      # 50 / 70 / 80%, about 2 minutes on 2 cores
"""
import argparse
import copy
import os
import tempfile

import torch
import torch.nn.functional as F
import torchvision

import pysparse


def trained_vit(epochs: int = 60, seed: int = 0):
    """(model, train loader, test loader): the transformer trained on digits with Adam."""
    torch.manual_seed(seed)
    split = pysparse.data.load("digits")
    train = pysparse.data.loader(split.train, 64, shuffle=True, seed=seed)
    test = pysparse.data.loader(split.test, 256)
    model = torchvision.models.VisionTransformer(image_size=8, patch_size=2, num_layers=2, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10, dropout=0.0)
    model.conv_proj = torch.nn.Conv2d(1, 64, kernel_size=2, stride=2)  # grey images
    pysparse.train(model, train, epochs=epochs, lr=1e-3, optimizer="adam")
    return model.eval(), train, test


def file_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.safetensors")
        pysparse.save(model, path)
        return os.path.getsize(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.8])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--calibration", type=int, default=8, help="calibration batches of 64 for compensate / wanda")
    args = parser.parse_args(argv)
    model, train, test = trained_vit(args.epochs)
    calib = [b for _, b in zip(range(args.calibration), train)]
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    print(f"dense: test accuracy {pysparse.accuracy(model, test):.4f}, {dense_bytes} bytes of float32 weights")
    for sparsity in args.sparsity:
        for method in ("magnitude", "wanda"):
            for compensate in (False, True):
                net = copy.deepcopy(model)
                result = pysparse.prune(net, method, sparsity=sparsity, scope="layer", data=calib,
                                        num_batches=len(calib), compensate=compensate, loss_fn=F.cross_entropy)
                acc = pysparse.accuracy(net, test)
                attn = [k for k in result.masks if "self_attention" in k]
                line = (f"{sparsity:.2f} {method:9s} compensate={str(compensate):5s}: test accuracy {acc:.4f} "
                        f"({len(attn)} attention weights pruned)")
                if method == "wanda" and compensate:
                    pysparse.sparsify(net, result.masks, min_sparsity=0.0)
                    n_attn = sum(isinstance(m, pysparse.SparseMultiheadAttention) for m in net.modules())
                    line += (f"; sparsified ({n_attn} SparseMultiheadAttention): {pysparse.accuracy(net, test):.4f}, "
                             f"file {file_bytes(net) / dense_bytes:.3f} of the dense weights")
                print(line, flush=True)


if __name__ == "__main__":
    main()

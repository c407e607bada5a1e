"""README.md stays true: its Python examples run as written, its CLI lines parse, the make targets and the
``pysparse.*`` names it mentions exist.

Each ```python block runs in a namespace holding the objects its text assumes (a weight ``w``, a digits
``loader``, ...), in a temporary working directory. A few long arguments are shortened (``steps=3000`` ->
``steps=4``) so the whole file runs in seconds; every replacement must find its text in the block exactly
once, so a README edit that changes a call shows up here.
"""
import copy
import re
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import pysparse
from pysparse.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


# How each python block of README.md begins; each has its test below.
BLOCKS = {
    "kernels": "import pysparse\n\n# Fused saliency",
    "layers": "import pysparse\nfrom pysparse import SparseLinear",
    "prune": "result = pysparse.prune(model, \"taylor\"",
    "retrain": "init = pysparse.remember_init(model)",
    "gan": "from pysparse.gan import",
    "synth": "from pysparse import synth",
}


def python_block(key: str) -> str:
    found = [b for b in blocks("python") if b.startswith(BLOCKS[key])]
    assert len(found) == 1, f"README has {len(found)} python blocks starting with {BLOCKS[key]!r}"
    return found[0]


def shorten(code: str, replacements) -> str:
    for old, new in replacements:
        assert code.count(old) == 1, f"README block no longer contains {old!r} exactly once"
        code = code.replace(old, new)
    return code


def run(code: str, namespace: dict, tmp_path: Path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def digits_loaders(batch_size: int = 64):
    split = pysparse.data.load("digits")
    g = torch.Generator().manual_seed(0)
    return split, DataLoader(split.train, batch_size=batch_size, shuffle=True, generator=g), \
        DataLoader(split.test, batch_size=256)


def test_every_python_block_is_tested():
    untested = [b.splitlines()[0] for b in blocks("python") if not any(b.startswith(p) for p in BLOCKS.values())]
    assert len(blocks("python")) == len(BLOCKS) and not untested, f"README blocks without a test here: {untested}"


def test_kernels_block(tmp_path, monkeypatch):
    code = python_block("kernels")
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(32, 64))
    w.grad = torch.randn(32, 64)
    state = {"exp_avg": torch.randn(32, 64), "exp_avg_sq": torch.rand(32, 64)}
    s1, s2 = torch.rand(10, 10), torch.rand(100)
    s1[0, :5] = 1e-4
    ns = run(code, {"w": w, "g": w.grad, "h": torch.rand(32, 64), "state": state,
                    "s1": s1, "s2": s2, "s3": torch.rand(3, 3, 3)}, tmp_path, monkeypatch)
    assert [torch.equal(m, s >= 1e-3) for m, s in zip(ns["masks"], (s1, s2))] == [True, True]
    mask = ns["mask"]
    assert mask.shape == w.shape and (mask.view(32, 16, 4).sum(-1) == 2).all()
    for t in (w, w.grad, state["exp_avg"], state["exp_avg_sq"]):
        assert (t[~mask] == 0).all() and (t[mask] != 0).all()


def test_layers_block(tmp_path, monkeypatch):
    code = python_block("layers")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    masks = {n: torch.rand_like(p) > 0.9 for n, p in resnet.named_parameters() if n.endswith("weight") and p.dim() > 1}
    conv2d = nn.Conv2d(64, 128, 3, padding=1)
    ns = {"torchvision": torchvision, "linear": nn.Linear(784, 300), "mask": torch.rand(300, 784) > 0.9,
          "new_mask": torch.rand(300, 784) > 0.8,
          "conv2d": conv2d, "conv_mask": torch.rand_like(conv2d.weight) > 0.9, "masks": masks,
          "mha": nn.MultiheadAttention(64, 4), "m1": torch.rand(192, 64) > 0.9, "m2": torch.rand(64, 64) > 0.9,
          "F": nn.functional, "x": torch.randn(2, 784), "b": torch.randn(300), "torch": torch, "nn": nn}
    ns = run(code, ns, tmp_path, monkeypatch)
    # xavier_uniform_ into layer.weight set its kept values (bound sqrt(6 / 1084) = 0.074; reset_parameters': 0.036)
    assert 0.06 < ns["layer"].values.abs().max() <= 0.0744
    assert (ns["layer"].weight[~ns["layer"].mask()] == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(ns["y"], ns["x"] @ (ns["linear"].weight * ns["mask"]).T + ns["b"])
    assert torch.equal(ns["layer"].mask(), ns["new_mask"]) and ns["conv"].sparsity > 0.85
    assert torch.equal(ns["attn"].masks()["in_proj_weight"], ns["m1"])
    assert torch.equal(ns["attn"].masks()["out_proj.weight"], ns["m2"])
    dense_bytes = sum(p.numel() * 4 for p in resnet.parameters())
    assert (tmp_path / "model.safetensors").stat().st_size < 0.2 * dense_bytes  # layers left dense: packed
    model = ns["model"]  # loaded, then densified: the masked dense ResNet-18, its BatchNorms folded
    assert not any(isinstance(m, (pysparse.SparseLinear, pysparse.SparseConv2d)) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) and model.conv1.bias is not None
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                assert (p[~masks[n]] == 0).all(), n


def test_prune_block(tmp_path, monkeypatch):
    code = python_block("prune")
    split, loader, _ = digits_loaders()
    torch.manual_seed(0)
    ns = run(code, {"pysparse": pysparse, "F": F, "model": pysparse.models.mlp(), "loader": loader,
                    "loss": F.cross_entropy}, tmp_path, monkeypatch)
    result = ns["result"]
    assert result.reconstruction and abs(result.sparsity - 0.8) < 0.01
    layers = [m for m in ns["model"].modules() if isinstance(m, pysparse.SparseLinear)]
    assert layers, "sparsify(model, result.masks) left no sparse layer"


def test_retrain_block(tmp_path, monkeypatch):
    code = shorten(python_block("retrain"),
                   [("epochs=20, lr=0.01", "epochs=1, lr=0.01"), ("epochs=5, lr=0.1", "epochs=1, lr=0.1"),
                    ("epochs=20, lr=0.1)", "epochs=1, lr=0.1)")])
    split, loader, test_loader = digits_loaders()
    torch.manual_seed(0)
    model = pysparse.models.mlp()
    result = pysparse.prune(copy.deepcopy(model), "magnitude", sparsity=0.9)
    finetuned = []
    ns = {"pysparse": pysparse, "model": model, "result": result, "loader": loader, "test_loader": test_loader,
          "my_finetune": lambda m, masks: finetuned.append(len(masks)),
          "opt": torch.optim.SGD(model.parameters(), lr=0.01)}
    ns = run(code, ns, tmp_path, monkeypatch)
    assert len(ns["out"].losses) > 0 and finetuned == [3, 3, 3, 3]
    assert set(ns["masks"]) == set(result.masks)  # from_torch_prune gives back the masks to_torch_prune applied
    for n, m in result.masks.items():
        assert torch.equal(ns["masks"][n], m), n
    assert (tmp_path / "sensitivity.png").stat().st_size > 0 and (tmp_path / "report.png").stat().st_size > 0


def test_gan_and_synth_blocks(tmp_path, monkeypatch):
    gan = shorten(python_block("gan"),
                  [("steps=3000", "steps=4"), ("checkpoint_every=500", "checkpoint_every=2"),
                   ("num_classes=10)\n# {", "num_classes=10, epochs=1)\n# {")])
    synth_code = shorten(python_block("synth"),
                         [("real=(x_train, y_train))", "real=(x_train, y_train), iterations=6)"),
                          ("seeds=5)", "seeds=1, epochs=2, full_epochs=1)"),
                          ("epochs=50, lr=0.01", "epochs=1, lr=0.01")])
    split, _, _ = digits_loaders()
    x_train, y_train = pysparse.gan.trainer.tensors_of(split.train)
    x_test, y_test = pysparse.gan.trainer.tensors_of(split.test)
    torch.manual_seed(0)
    dense_model = pysparse.models.cnn()
    pruned = copy.deepcopy(dense_model)
    masks = pysparse.prune(pruned, "magnitude", sparsity=0.9).masks
    ns = {"pysparse": pysparse, "SparseConv2d": pysparse.SparseConv2d, "split": split,
          "x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
          "labels": torch.arange(10).repeat(10), "dense_model": dense_model, "pruned": pruned, "masks": masks}
    ns = run(gan, ns, tmp_path, monkeypatch)
    trainer = ns["trainer"]
    assert trainer.step_count == 4 and (tmp_path / "runs/gan/checkpoint.pt").exists()
    images = ns["images"]
    assert images.shape == (100, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    ns = run(synth_code, ns, tmp_path, monkeypatch)
    s = ns["s"]
    assert len(s) == 100 and s.image_shape == (1, 8, 8)
    assert (tmp_path / "synthetic.safetensors").exists() and (tmp_path / "synthetic.png").exists()
    for n, m in masks.items():  # connectivity retraining kept the pruned weights at zero
        assert (pruned.get_parameter(n)[~m] == 0).all(), n


def cli_lines() -> list[list[str]]:
    lines = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if "pysparse " in line and not line.startswith("pip"):
                words = shlex.split(line)
                start = words.index("pysparse") + 1
                lines.append([w for w in words[start:] if w != "..."])
    return lines


def test_cli_lines_parse():
    lines = cli_lines()
    assert {words[0] for words in lines} == {"prune", "gan", "compress", "demo"}
    parser = build_parser()
    for words in lines:
        parser.parse_args(words)  # argparse exits (SystemExit) on an unknown option or a bad value


def test_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    used = {w.split()[1] for b in blocks("bash") for w in b.splitlines() if w.startswith("make ")}
    assert used and used <= targets, used - targets
    assert "make test" in (ROOT / ".ci/run").read_text()


# The pages the README sends users to for the details: held to the same standard.
DOCS = [ROOT / "docs" / "layers.md", ROOT / "benchmarks" / "README.md"]


def test_named_api_exists():
    text = "\n".join([README, *(p.read_text() for p in DOCS)])
    names = set(re.findall(r"(?<![\w.])pysparse(?:\.[A-Za-z_]\w*)+", text))
    assert len(names) > 30
    missing = []
    for name in sorted(names):  # as a user reaches them after `import pysparse`
        obj = pysparse
        for attr in name.split(".")[1:]:
            if not hasattr(obj, attr):
                missing.append(name)
                break
            obj = getattr(obj, attr)
    assert not missing, f"README or its pages name what `import pysparse` does not give: {missing}"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_resolve():
    """Every relative link of the README and its pages names a file that exists (and a heading it has)."""
    broken = []
    for page in [ROOT / "README.md", *DOCS]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and anchor not in {_anchor(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), re.M)}:
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_benchmark_scripts_exist():
    """benchmarks/README.md describes scripts that are there, and every script there is described."""
    text = DOCS[1].read_text()
    named = set(re.findall(r"(?<![\w.])(\w+\.(?:py|sh))\b", text))
    here = {p.name for p in (ROOT / "benchmarks").iterdir() if p.suffix in (".py", ".sh")}
    assert named - here == set(), named - here
    helpers = {"conftest.py", "_util.py", "_baselines.py"}
    assert here - named - helpers == set(), f"benchmarks without a word in benchmarks/README.md: {here - named - helpers}"

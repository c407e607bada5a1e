import torch

# Device and dtype lists and tensor builders live in pysparse.testing (shared with benchmarks/).
torch.manual_seed(0)

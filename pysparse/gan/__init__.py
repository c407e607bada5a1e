"""Image synthesis with sparse GANs: DCGAN-style models made of pysparse's sparse layers, the trainer, and
offline quality metrics."""
from .losses import LOSSES, d_loss, g_loss
from .models import Discriminator, Generator, dcgan_init_
from .trainer import GANTrainer, models_from_checkpoint, read_checkpoint

__all__ = ["Generator", "Discriminator", "GANTrainer", "dcgan_init_", "LOSSES", "d_loss", "g_loss",
           "read_checkpoint", "models_from_checkpoint"]

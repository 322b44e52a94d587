"""hybvit: one Vision Transformer that classifies and generates (ViT, GenViT, HybViT; Yang et al., 2022)."""
from .config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig, preset_config
from .diffusion import GaussianDiffusion
from .errors import HybvitError
from .model import ViT
from .sample import Run, load_run

__version__ = "0.1.0"
__all__ = ["Config", "ModelConfig", "DiffusionConfig", "DataConfig", "TrainConfig", "preset_config",
           "GaussianDiffusion", "ViT", "Run", "load_run", "HybvitError", "__version__"]

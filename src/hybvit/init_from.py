"""`hybvit train --init-from SOURCE`: a new run that starts from existing weights (fine-tuning).

SOURCE is a hybvit run directory (its EMA weights), a model folder of `hybvit export`, a .safetensors or last.pt
file of hybvit, or a checkpoint of the paper's code (official.py). The new run gets a fresh optimizer, schedule and
step count. Its model configuration is the source's, with one exception: the class count follows the data, and a
different count gives a freshly initialised classifier head (head.1). No adaptation to the data (such as the
patch size of a user's dataset) is applied to a model that already exists.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import official
from .config import Config, ModelConfig
from .errors import HybvitError
from .model import ViT
from .sample import check_weights_fit, weights_file

HEAD = ("head.1.weight", "head.1.bias")      # the classifier's Linear: re-initialised when the class count changes


@dataclass(frozen=True)
class Source:
    weights: dict[str, torch.Tensor]
    model: ModelConfig
    schedule: str | None                    # an official checkpoint's noise schedule (None for hybvit's own files)
    label: str                              # what it is, for notes: "<path> (sha256 ...)"


@lru_cache(maxsize=1)
def read_source(source: str) -> Source:
    """The weights and model configuration of SOURCE (read once per process)."""
    path = Path(source)
    if not path.exists():
        raise HybvitError(f"--init-from '{source}' does not exist; give a run directory, an exported model folder, "
                          f"or a checkpoint file")
    if path.is_dir() or path.suffix == ".safetensors" or path.name == "last.pt":
        file = weights_file(path) if path.is_dir() else path
        weights, cfg_dict = ckpt.load_weights(file)
        cfg = Config.from_saved(cfg_dict, f"'{file}'")
        cfg.validate()
        check_weights_fit(cfg, weights, file)
        return Source(weights, cfg.model, None, f"{source} ({file.name}, sha256 {official.sha256_file(file)})")
    if official.is_official_file(path):
        oc = official.read_official(path)
        model = official.infer_model_config(oc.vit)
        weights = official.official_to_hybvit(oc.vit, model)
        return Source(weights, model, official.match_schedule(oc.schedule),
                      f"{source} (the paper's code's {'EMA' if oc.kind == 'ema' else 'raw'} weights, "
                      f"sha256 {oc.sha256})")
    raise HybvitError(f"--init-from '{source}' is neither a folder nor a .safetensors, last.pt or .pth checkpoint; "
                      f"give a run directory, an exported model folder, or a checkpoint file")


def take_model(cfg: Config, source: Source) -> None:
    """Give cfg the source's model configuration (before --set, which may still change it)."""
    cfg.model = dataclasses.replace(source.model)


def fit_source(cfg: Config, num_classes: int, source: Source, class_count_given: bool) -> list[str]:
    """Fit the source's model to the run: the class count follows the data unless --set gave it (a count other than
    the source's re-initialises the head); any other tensor that does not fit cfg.model (after --set model.*) is a
    one-line error listing them. Returns the notes that say what was done."""
    if source.schedule is not None and source.schedule != cfg.diffusion.schedule:
        raise HybvitError(f"--init-from: the checkpoint was trained with the {source.schedule} noise schedule and "
                          f"this run uses {cfg.diffusion.schedule}; add --set diffusion.schedule={source.schedule}")
    if not class_count_given:
        cfg.model.num_classes = num_classes
    weights = start_weights(cfg, source)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ViT(cfg.model).state_dict().items()}
    wrong = [f"{k} {tuple(v.shape)} -> {expected.get(k, 'none')}" for k, v in weights.items()
             if expected.get(k) != tuple(v.shape)]
    wrong += [f"{k} missing" for k in expected if k not in weights and k not in HEAD]
    if wrong:
        raise HybvitError(f"--init-from: {len(wrong)} tensor(s) do not fit this run's model: {'; '.join(wrong[:8])}"
                          f"{' ...' if len(wrong) > 8 else ''}; drop the --set model.* that changes them")
    notes = [f"initialised from {source.label}; the model configuration is the source's"]
    if cfg.model.num_classes != source.model.num_classes:
        notes.append(f"classifier head re-initialised: {source.model.num_classes} -> {cfg.model.num_classes} "
                     f"classes")
    return notes


def start_weights(cfg: Config, source: Source) -> dict[str, torch.Tensor]:
    """The tensors the run starts from: the source's, without the head when the class count changed."""
    if cfg.model.num_classes == source.model.num_classes:
        return dict(source.weights)
    return {k: v for k, v in source.weights.items() if k not in HEAD}


def load_into(model: ViT, weights: dict[str, torch.Tensor]) -> None:
    """Copy the initial weights into a freshly built model (a left-out head keeps its new initialisation)."""
    state = model.state_dict()
    state.update({k: v.to(state[k].dtype) for k, v in weights.items()})
    model.load_state_dict(state)


__all__ = ["Source", "read_source", "take_model", "fit_source", "start_weights", "load_into"]

"""Loading a VLM of any supported family, offline, and turning questions into its inputs.

This module owns the model side of the study: where a model is (a local folder, or a hub id already in
the local Hugging Face cache: nothing is downloaded), checking it before any weights are loaded (a
supported family, an image processor and a tokenizer, whole safetensors files), loading it with its
family's class, the prompt: the processor's chat template when it has one (the bundled model's
renders LLaVA-1.5's ``USER: <image>\\n{question} ASSISTANT:``), else the question after the image token,
and the shapes scene config a model was trained on (``scene_config``: its folder's ``scene_config.json``,
which ``python -m analysis.train_bundled`` writes) with the refusal of a split generated with another
(``evaluation_scene``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from analysis import paths
from analysis.benchmark.scene_config import DEFAULT, FIRST, SceneConfig, difference, read_record

SCENE_RECORD = "scene_config.json"  # in a model folder: the shapes scene config it was trained on


class ModelError(ValueError):
    """A model that cannot be used; the message names what is missing or supported."""


def resolve(model: str | Path) -> Path:
    """The folder of ``model``: itself if it is a local folder, else the snapshot of a hub id in the local
    Hugging Face cache (``HF_HUB_CACHE``), without any download."""
    folder = Path(model)
    if folder.is_dir():
        return folder
    text = str(model)
    if folder.is_absolute() or text.startswith((".", "~")) or text.count("/") != 1:
        raise ModelError(f"no model at {model}: give a local Hugging Face model folder with config.json (the "
                         "bundled one is data/shapes-llava, restored by git) or a hub id such as "
                         "llava-hf/llava-1.5-7b-hf that is in the local Hugging Face cache")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(text, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise ModelError(f"{model} is not in the local Hugging Face cache and nothing is downloaded here; "
                         f"fetch it where there is a network (`huggingface-cli download {model}`) and point "
                         "HF_HUB_CACHE at that cache, or give a local folder") from None


def check_model(model: str | Path = paths.BUNDLED_MODEL):
    """(config, processor) of a model, checked before any weights are read: a supported VLM family
    (``lofi.families.supported()``) with an image processor and a tokenizer."""
    from transformers import AutoConfig, AutoProcessor

    from lofi.families import UnsupportedModelError, family_class, supported
    folder = resolve(model)
    if not (folder / "config.json").is_file():
        raise ModelError(f"no model at {model}: expected a Hugging Face model folder with config.json "
                         "(the bundled one is data/shapes-llava, restored by git)")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as e:
        raise ModelError(f"{folder / 'config.json'} is not a transformers configuration ({e})") from None
    try:
        family_class(config)
    except UnsupportedModelError:
        raise ModelError(f"{model} is a {getattr(config, 'model_type', None)!r} model, not a VLM lofi supports "
                         f"({', '.join(supported())})") from None
    try:
        processor = AutoProcessor.from_pretrained(folder)
    except Exception as e:  # transformers raises many types here; all mean the same to the user
        import importlib.util
        if importlib.util.find_spec("torchvision") is None and "VIDEO" in str(e).upper():
            raise ModelError(f"{model}'s processor ({getattr(config, 'model_type', '?')}) needs transformers' video "
                             "processor, which needs torchvision: install the torchvision build that matches your "
                             "torch") from None
        raise ModelError(f"{model} has no usable processor ({type(e).__name__}: {str(e).splitlines()[0]}); the "
                         "folder needs the processor files save_pretrained writes (processor_config.json or "
                         "preprocessor_config.json, and the tokenizer's)") from None
    if not (hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")):
        raise ModelError(f"{model} has a {type(processor).__name__}, not an image-and-text processor; save the "
                         "model's processor (e.g. LlavaProcessor.save_pretrained) into the folder")
    return config, processor


def check_weights(files: Sequence[Path]) -> None:
    """Every safetensors file in ``files`` whole: its header reads and its tensors cover the file exactly (a
    truncated or padded file fails here, before a run starts, not while the model loads)."""
    from safetensors import SafetensorError, safe_open
    for file in files:
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, "pt"):
                    pass
            except (SafetensorError, OSError) as e:
                raise ModelError(f"{file} is not a whole safetensors file ({e}); restore or re-save it") from None


def load_model(model: str | Path = paths.BUNDLED_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32,
               checked: tuple | None = None, progress: bool = True):
    """(model, processor) of a checked model (``check_model``) with its family's class, in eval mode.
    ``checked``: the (config, processor) ``check_model`` already returned for it, not read again;
    ``progress``: transformers' loading bar."""
    import transformers
    from transformers.utils import logging

    from lofi.families import family_class
    config, processor = checked or check_model(model)
    model_class = getattr(transformers, family_class(config).classes[0])
    shown = logging.is_progress_bar_enabled()
    if not progress:
        logging.disable_progress_bar()
    try:
        loaded = model_class.from_pretrained(resolve(model), dtype=dtype).to(device).eval()
    finally:
        if shown:
            logging.enable_progress_bar()
    return loaded, processor


def prompt(processor, question: str) -> str:
    """One question about one image, as the model was trained to read it: the processor's chat template
    with an image and the question, or the question after the image token."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"{getattr(processor, 'image_token', '<image>')}\n{question}"


def scene_config(model: str | Path) -> SceneConfig | None:
    """The shapes scene config ``model`` was trained on (its folder's ``SCENE_RECORD``), or None for a model
    without that record (a model that predates the record, trained on the first bundled config ``FIRST``)."""
    record = resolve(model) / SCENE_RECORD
    if not record.is_file():
        return None
    try:
        return read_record(record, "restore the file its training run wrote (python -m analysis.train_bundled)")
    except ValueError as e:
        raise ModelError(str(e)) from None


def evaluation_scene(model: str | Path, dataset: str | Path) -> SceneConfig:
    """The scene config of ``model`` (``FIRST`` without a record), refused (``ModelError``) when ``dataset``
    records that it was generated with another: its images would not be the pictures the model learnt."""
    from analysis.benchmark.datasets import scene_config as split_scene_config
    trained, generated = scene_config(model), split_scene_config(dataset)
    if trained is not None and generated is not None and trained != generated:
        record = resolve(model) / SCENE_RECORD
        raise ModelError(f"dataset {dataset} was generated with another scene config than model {model} was "
                         f"trained on ({difference(generated, trained)}); evaluate on a split of the model's "
                         f"config: python -m analysis.shapes --scene-config {record} --out FOLDER")
    return FIRST if trained is None else trained


def batch_inputs(processor, samples: Sequence, blank: bool = False, scene: SceneConfig = DEFAULT):
    """The processor's inputs for a batch of samples, left-padded (``blank``: every image replaced by the
    blank image of ``scene``, the model's scene config: the check that a model uses the picture)."""
    from analysis.benchmark import shapes
    images = [shapes.blank_image(scene) if blank else s.load_image() for s in samples]
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=[prompt(processor, s.question) for s in samples], return_tensors="pt",
                     padding=True)

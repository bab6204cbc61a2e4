"""The bundled model: where it lives, and how its tokenizer, processor and architecture are built.

This module owns the recipe of ``data/shapes-llava`` -- a small ``LlavaForConditionalGeneration``
(CLIP vision tower, 2-layer GELU projector, Llama language model) trained from scratch on the shapes
benchmark (``analysis.shapes``) by ``python -m analysis.train_bundled``. Its tokenizer is a word-level
vocabulary of the benchmark's words; the processor, chat template and prompt are those of LLaVA-1.5
(``USER: <image>\\n{question} ASSISTANT:``), so the folder loads with ``from_pretrained`` exactly as a
llava-hf checkpoint does, and every other module treats it as just another LLaVA.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from analysis.benchmark import shapes
from analysis.benchmark.scene_config import DEFAULT, SceneConfig
from analysis.paths import BUNDLED_BENCHMARK, BUNDLED_MODEL, DATA_DIR, REPO_ROOT  # noqa: F401

PROMPT = "USER: <image>\n{question} ASSISTANT:"
SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>", "<image>")
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]  # CLIP's, as in llava-hf
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
# Normalisation centred on the benchmark's background (``--image-norm background`` in training): an
# empty patch enters the vision tower as zeros. With CLIP's statistics the constant background
# dominated every patch embedding: a linear probe of patch row and column stayed at chance for 200
# from-scratch steps, and was learnt in 40 with these.
BACKGROUND_STD = [0.3, 0.3, 0.3]
NORMALISATIONS = ("clip", "background")
PATCH_SIZE = 6  # px, for scenes without a grid: 72 px images are 12 x 12 = 144 visual tokens
# The bundled model's quality bar on the test split, greedy answers (its card states whether it is met):
# accuracy in % overall, on existence questions and on every question family (none left at chance), and the
# points of overall accuracy it must lose when every image is blank (the answers must come from the picture).
QUALITY_BAR = {"overall": 85.0, "existence": 90.0, "family": 75.0, "blank_drop": 30.0}
# The LLaVA-1.5 chat template of llava-hf, reduced to what a single-image question needs.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% else %}ASSISTANT: {% endif %}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def patch_size(scene: SceneConfig = DEFAULT) -> int:
    """The vision tower's patch side for ``scene``: its grid cell when it has a grid (one object, one visual
    token), else ``PATCH_SIZE``."""
    return scene.cell if scene.grid else PATCH_SIZE


def prompt(question: str) -> str:
    """The LLaVA-1.5 prompt for one question about one image."""
    return PROMPT.format(question=question)


def build_tokenizer(scene: SceneConfig = DEFAULT) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over the benchmark vocabulary of ``scene``, with a BOS like
    Llama's."""
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + shapes.vocabulary(scene))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
        model_max_length=512)


def image_statistics(normalisation: str, scene: SceneConfig = DEFAULT) -> tuple[list[float], list[float]]:
    """(mean, std) per RGB channel of an image normalisation: CLIP's, or centred on ``scene``'s background."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown image normalisation {normalisation!r}; valid: {sorted(NORMALISATIONS)}")
    if normalisation == "clip":
        return IMAGE_MEAN, IMAGE_STD
    return [c / 255 for c in scene.background], BACKGROUND_STD


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None, image_size: int | None = None,
                    patch_size: int = PATCH_SIZE, normalisation: str = "clip", scene: SceneConfig = DEFAULT
                    ) -> LlavaProcessor:
    """LLaVA-1.5's processor for ``scene``'s images (``image_size``: the scene's unless given) and
    vocabulary (``tokenizer``: ``build_tokenizer(scene)`` unless given)."""
    mean, std = image_statistics(normalisation, scene)
    image_size = scene.image_size if image_size is None else image_size
    # the PIL backend: the default one needs torchvision, which has no CPU build here
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=mean, image_std=std, do_convert_rgb=True)
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(scene),
        patch_size=patch_size, vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1)


def build_config(tokenizer: PreTrainedTokenizerFast, *, text_layers: int = 8, text_width: int = 192,
                 text_heads: int = 3, text_kv_heads: int = 3, vision_layers: int = 4,
                 vision_width: int = 128, image_size: int = DEFAULT.image_size,
                 patch_size: int = PATCH_SIZE, text_init: float = 0.02) -> LlavaConfig:
    """The bundled architecture; keyword arguments shrink it for smoke tests."""
    vision = CLIPVisionConfig(
        hidden_size=vision_width, intermediate_size=4 * vision_width, num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_width // 32), image_size=image_size, patch_size=patch_size,
        projection_dim=vision_width)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=int(text_width * 8 / 3 // 16 * 16),
        num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=text_kv_heads,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        initializer_range=text_init)
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id)

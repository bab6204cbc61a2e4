"""LLaVA-1.5-7B's configuration (llava-hf/llava-1.5-7b-hf), written out: no download needed."""

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig


def llava_15_7b_config(text_layers: int = 32, vision_layers: int = 24) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=text_layers,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", pad_token_id=32001)

"""config.json parsing: both rope spellings, unknown keys, and errors that name the field."""
import json

import pytest
import torch

from llama_mm import ConfigError, MllamaConfig
from checkpoints import tiny_config_dict

# Llama-3.2-11B-Vision's config.json as the Hub serves it (written by transformers 4.45): rope_scaling + rope_theta,
# torch_dtype, and many generic keys.
HUB_11B = {
    "architectures": ["MllamaForConditionalGeneration"], "image_token_index": 128256, "model_type": "mllama",
    "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0",
    "text_config": {
        "_name_or_path": "", "add_cross_attention": False, "architectures": None, "bad_words_ids": None,
        "begin_suppress_tokens": None, "bos_token_id": 128000, "chunk_size_feed_forward": 0,
        "cross_attention_hidden_size": None, "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
        "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False, "dropout": 0,
        "early_stopping": False, "encoder_no_repeat_ngram_size": 0, "eos_token_id": 128001,
        "finetuning_task": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "hidden_act": "silu",
        "hidden_size": 4096, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "initializer_range": 0.02,
        "intermediate_size": 14336, "is_decoder": False, "is_encoder_decoder": False,
        "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0, "max_length": 20,
        "max_position_embeddings": 131072, "min_length": 0, "model_type": "mllama_text_model",
        "no_repeat_ngram_size": 0, "num_attention_heads": 32, "num_beam_groups": 1, "num_beams": 1,
        "num_hidden_layers": 40, "num_key_value_heads": 8, "num_return_sequences": 1, "output_attentions": False,
        "output_hidden_states": False, "output_scores": False, "pad_token_id": 128004, "prefix": None,
        "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False, "repetition_penalty": 1.0,
        "return_dict": True, "return_dict_in_generate": False, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "sep_token_id": None, "suppress_tokens": None, "task_specific_params": None,
        "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False, "tie_word_embeddings": False,
        "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": "bfloat16", "torchscript": False,
        "typical_p": 1.0, "use_bfloat16": False, "use_cache": True, "vocab_size": 128256,
    },
    "vision_config": {
        "attention_heads": 16, "hidden_act": "gelu", "hidden_size": 1280, "image_size": 560,
        "intermediate_layers_indices": [3, 7, 15, 23, 30], "intermediate_size": 5120, "max_length": 20,
        "max_num_tiles": 4, "model_type": "mllama_vision_model", "norm_eps": 1e-05, "num_channels": 3,
        "num_global_layers": 8, "num_hidden_layers": 32, "patch_size": 14,
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        "torch_dtype": "bfloat16", "vision_output_dim": 7680,
    },
}


def write(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_hub_11b_config(tmp_path):
    cfg = MllamaConfig.from_pretrained(write(tmp_path, HUB_11B))
    assert cfg.dtype == torch.bfloat16
    assert cfg.text.cross_attention_layers == (3, 8, 13, 18, 23, 28, 33, 38)
    assert cfg.text.head_dim == 128 and cfg.text.num_kv_groups == 4
    assert cfg.vision.num_patches == 1601 and cfg.vision.padded_patches == 1608
    assert cfg.text.rope.rope_type == "llama3" and cfg.text.rope.factor == 8.0


@pytest.mark.parametrize("style", ["rope_scaling", "rope_parameters"])
def test_rope_inv_freq_matches_transformers(tmp_path, style):
    from transformers import MllamaConfig as HFConfig
    from transformers.models.mllama.modeling_mllama import MllamaRotaryEmbedding

    raw = json.loads(json.dumps(HUB_11B))
    if style == "rope_parameters":
        t = raw["text_config"]
        t["rope_parameters"] = dict(t.pop("rope_scaling"), rope_theta=t.pop("rope_theta"))
    ours = MllamaConfig.from_pretrained(write(tmp_path, raw)).text
    hf = HFConfig.from_pretrained(tmp_path).text_config
    expected = MllamaRotaryEmbedding(hf).inv_freq
    torch.testing.assert_close(ours.rope.inv_freq(ours.head_dim), expected, rtol=0, atol=0)


def test_90b_shapes_parse(tmp_path):
    raw = json.loads(json.dumps(HUB_11B))
    raw["text_config"].update(hidden_size=8192, num_hidden_layers=100, num_attention_heads=64,
                              intermediate_size=28672, cross_attention_layers=list(range(3, 100, 5)))
    cfg = MllamaConfig.from_pretrained(write(tmp_path, raw))
    assert len(cfg.text.cross_attention_layers) == 20 and cfg.text.num_kv_groups == 8


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda r: r["vision_config"].update(vision_output_dim=1234), "vision_output_dim"),
        (lambda r: r["text_config"].pop("hidden_size"), "hidden_size"),
        (lambda r: r.pop("vision_config"), "vision_config"),
        (lambda r: r["text_config"].update(num_key_value_heads=5), "num_key_value_heads"),
        (lambda r: r["text_config"].update(cross_attention_layers=[3, 40]), "cross_attention_layers"),
        (lambda r: r["text_config"].update(rope_scaling=None, rope_theta=10000.0,
                                           rope_parameters={"rope_type": "default", "rope_theta": 5.0}), "rope_theta"),
        (lambda r: r["text_config"].update(rope_parameters={"rope_type": "default"}), "rope_type"),
        (lambda r: r["text_config"]["rope_scaling"].pop("factor"), "factor"),
        (lambda r: r["text_config"]["rope_scaling"].update(rope_type="yarn"), "rope_type"),
        (lambda r: r.update(image_token_index=7), "image_token_index"),
        (lambda r: r["vision_config"].update(image_size=561), "image_size"),
        (lambda r: r["text_config"].update(vocab_size="big"), "vocab_size"),
        (lambda r: r["vision_config"].update(max_num_tiles=2), "max_num_tiles"),
    ],
)
def test_bad_config_names_the_field(tmp_path, mutate, field):
    raw = json.loads(json.dumps(HUB_11B))
    mutate(raw)
    with pytest.raises(ConfigError, match=field):
        MllamaConfig.from_pretrained(write(tmp_path, raw))


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        MllamaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MllamaConfig.from_pretrained(tmp_path)


def test_tiny_test_config_round_trips(tmp_path):
    t, v = tiny_config_dict()
    cfg = MllamaConfig.from_dict({"text_config": t, "vision_config": v, "image_token_index": t["vocab_size"]})
    assert cfg.vision.vision_output_dim == v["hidden_size"] * 3

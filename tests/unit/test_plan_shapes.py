"""Model shapes counted on the meta device: published sizes, bnb's and peft's own counts."""

from __future__ import annotations

import json

import pytest

from swarm.errors import UserError
from swarm.plan.shapes import bundled_names, load_shape

# Exact parameter counts from the models' safetensors metadata on the Hugging Face hub.
EXACT = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-14b": 14_770_033_664,
    "qwen2.5-32b": 32_763_876_352,
    "qwen2.5-72b": 72_706_203_648,
    "mistral-7b": 7_248_023_552,
    "gemma-2-9b": 9_241_705_984,
    "gemma-2-27b": 27_227_128_320,
}
# The sizes the model cards print, in billions (rounded as they round them).
PUBLISHED_B = {
    "llama-3.1-8b": 8.03, "llama-3.1-70b": 70.6, "llama-3.2-1b": 1.24, "llama-3.2-3b": 3.21,
    "qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09, "qwen2.5-7b": 7.62,
    "qwen2.5-14b": 14.8, "qwen2.5-32b": 32.8, "qwen2.5-72b": 72.7, "mistral-7b": 7.25,
    "gemma-2-2b": 2.61, "gemma-2-9b": 9.24, "gemma-2-27b": 27.2,
}


def test_every_required_architecture_is_bundled():
    assert set(PUBLISHED_B) == set(bundled_names())


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_parameter_counts(name):
    assert load_shape(name).total_params == EXACT[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_published_sizes(name):
    digits = len(str(PUBLISHED_B[name]).split(".")[1])
    assert round(load_shape(name).total_params / 1e9, digits) == PUBLISHED_B[name]


def test_llama_8b_split_between_4bit_and_16bit():
    shape = load_shape("llama-3.1-8b")
    # Embedding and head (not tied) stay 16-bit: 2 x 128256 x 4096; plus 65 norms of 4096.
    assert shape.params_16bit_when_quantized == 2 * 128256 * 4096 + 65 * 4096
    # Per layer: q, o 4096^2; k, v 4096 x 1024; three MLP matrices 4096 x 14336.
    per_layer = 2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    assert shape.quantizable_params == 32 * per_layer
    assert shape.layer_params == per_layer + 2 * 4096
    assert shape.lora_params("all-linear", 16) == 41_943_040  # the figure peft prints


def test_tied_embeddings_are_counted_once_and_not_quantized():
    shape = load_shape("gemma-2-9b")
    assert shape.tie_word_embeddings
    assert shape.params_16bit_when_quantized == 256000 * 3584 + (42 * 4 + 1) * 3584
    assert "lm_head" not in {g.pattern for g in shape.lora_groups("all-linear")}


def test_qwen_biases_stay_16bit():
    shape = load_shape("qwen2.5-7b")
    q = next(g for g in shape.groups if g.pattern.endswith("q_proj"))
    assert q.quantizable and q.other_numel == 3584


@pytest.mark.parametrize("hub_id, name", [
    ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b"),
    ("meta-llama/Meta-Llama-3.1-70B", "llama-3.1-70b"),
    ("meta-llama/Llama-3.3-70B-Instruct", "llama-3.1-70b"),
    ("Qwen/Qwen2.5-72B-Instruct", "qwen2.5-72b"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b"),
    ("google/gemma-2-9b-it", "gemma-2-9b"),
    ("QWEN2.5-14B", "qwen2.5-14b"),
])
def test_hub_ids_map_to_bundled_configs(hub_id, name):
    assert load_shape(hub_id).name == name


def test_unknown_hub_id_asks_for_a_local_folder():
    with pytest.raises(UserError, match="local folder"):
        load_shape("someone/my-private-model")


def test_local_folder_without_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_shape(str(tmp_path))


def test_unknown_lora_target_names_the_real_ones():
    with pytest.raises(UserError, match="q_proj"):
        load_shape("llama-3.1-8b").lora_params(["qkv_proj"], 8)


def test_counts_agree_with_bitsandbytes_and_peft(tmp_path):
    """Load a tiny model in 4-bit with real bitsandbytes, add LoRA with real peft, compare."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from swarm.tiny import model_config

    AutoModelForCausalLM.from_config(model_config("qwen2", 512, hidden=64, layers=2)).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map="cpu")
    shape = load_shape(str(tmp_path))
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert sum(m.in_features * m.out_features for m in linear4) == shape.quantizable_params
    packed = sum(m.weight.numel() * m.weight.element_size() for m in linear4)
    assert packed == shape.quantizable_params // 2
    assert sum(p.numel() for p in model.parameters()) - sum(m.weight.numel() for m in linear4) == \
        shape.params_16bit_when_quantized
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert trainable == shape.lora_params(targets, 8)
        model = peft_model.unload()


def test_config_json_of_a_local_folder_is_read(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = load_shape(str(tmp_path))
    assert shape.num_layers == 3 and shape.head_dim == 64 and shape.tie_word_embeddings
    layer = 2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512 + 2 * 256
    assert shape.total_params == 1000 * 256 + 3 * layer + 256

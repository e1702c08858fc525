"""Native DeepSeek-OCR v1: checkpoint layout, LoRA count, I/O strictness, trainability, generation, errors.

All on CPU: the full official config only on the ``meta`` device, everything that runs on the tiny model of
``DeepseekOCRv1Family.make_tiny`` (real vocabulary, real image geometry, real preprocessing).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import load_file, save_file

from dsocr.models.deepseek_ocr_v1.configuration import DeepseekOCRConfig
from dsocr.models.deepseek_ocr_v1.family import DeepseekOCRv1Family, tiny_config
from dsocr.models.deepseek_ocr_v1.modeling import DeepseekOCRForCausalLM

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "deepseek_ocr_v1"
FAMILY = DeepseekOCRv1Family()
IMAGE_TOKEN = 128815
PROMPT_IDS = [201, 21431, 126041, 16]  # "\nFree OCR."
ANSWER_IDS = [1880, 1418, 29941, 2372, 3255, 21, 1]  # 海信LED46EC3 + EOS
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def official_config_dict() -> dict:
    """The hub ``config.json`` shape: LM keys at top level AND in ``language_config``, model_type deepseek_vl_v2."""
    resolved = json.loads((GOLDEN / "forward.json").read_text())["config"]
    lm_keys = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads",
               "num_key_value_heads", "n_shared_experts", "n_routed_experts", "num_experts_per_tok",
               "first_k_dense_replace", "topk_method", "n_group", "topk_group", "use_mla", "kv_lora_rank",
               "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "max_position_embeddings",
               "bos_token_id", "eos_token_id", "lm_head", "rm_head"]
    lm = {k: resolved[k] for k in lm_keys} | {"num_hidden_layers": 12, "torch_dtype": "bfloat16"}
    return lm | {
        "architectures": ["DeepseekOCRForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_deepseekocr.DeepseekOCRConfig",
                     "AutoModel": "modeling_deepseekocr.DeepseekOCRForCausalLM"},
        "candidate_resolutions": resolved["candidate_resolutions"],
        "global_view_pos": "head",
        "language_config": dict(lm),
        "model_type": "deepseek_vl_v2",
        "projector_config": resolved["projector_config"],
        "tile_tag": "2D",
        "transformers_version": "4.46.3",
        "vision_config": resolved["vision_config"],
    }


@pytest.fixture(scope="module")
def meta_model() -> DeepseekOCRForCausalLM:
    config = DeepseekOCRConfig.from_dict(official_config_dict())
    with torch.device("meta"):
        return DeepseekOCRForCausalLM(config)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_v1")
    FAMILY.make_tiny(out, seed=0)
    return out


def _tiny_model(tiny_dir: Path, **overrides) -> DeepseekOCRForCausalLM:
    model = FAMILY.load_model(str(tiny_dir))
    for key, value in overrides.items():
        setattr(model.config, key, value)
    if "train_vision" in overrides:
        model.set_vision_trainable(overrides["train_vision"])
    return model


def _image_sample(model, size=(300, 48), mode="tiny", answer=True):
    """One training/prompt row built like the collator: [BOS] + slots + prompt (+ answer + EOS)."""
    inputs = FAMILY.image_processor(model, mode)(Image.new("RGB", size, (250, 250, 240)))
    ids = [0] + [IMAGE_TOKEN] * inputs.num_image_tokens + PROMPT_IDS
    labels = [-100] * len(ids)
    if answer:
        ids, labels = ids + ANSWER_IDS, labels + ANSWER_IDS
    return inputs, torch.tensor([ids]), torch.tensor([labels])


# ------------------------------------------------------------------------------------------------- layout


def test_config_reads_official_json_and_saves_deepseek_vl_v2(tmp_path):
    raw = official_config_dict()
    for key in ("hidden_size", "n_routed_experts"):  # only in language_config: must still be read
        del raw[key]
    config = DeepseekOCRConfig.from_dict(raw)
    assert (config.hidden_size, config.n_routed_experts, config.num_hidden_layers) == (1280, 64, 12)
    assert config.image_token_id == 128815 and config.rms_norm_eps == 1e-6 and not config.norm_topk_prob
    assert config.rope_parameters["rope_theta"] == 10000.0 and config.head_dim == 128
    assert config.add_aux_loss is False and config.train_vision is False
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "deepseek_vl_v2"
    assert saved["language_config"]["hidden_size"] == 1280
    assert DeepseekOCRConfig.from_pretrained(tmp_path).to_dict() == config.to_dict() | {
        "transformers_version": saved["transformers_version"]}


def test_state_dict_keys_equal_official_full_config(meta_model):
    ref = json.loads((GOLDEN / "state_dict_full.json").read_text())
    shapes = ref["shapes"]
    ours = {k: list(v.shape) for k, v in meta_model.state_dict().items()}
    # position_ids is an int64 buffer of the official CLIP module, absent from the checkpoint; we have none
    # (embedding arange(257) is the position table itself).
    expected = {k: v for k, v in shapes.items() if k not in ref["non_float_keys"]}
    assert set(ours) == set(expected), (sorted(set(expected) - set(ours))[:10], sorted(set(ours) - set(expected))[:10])
    assert ours == expected
    assert sum(p.numel() for p in meta_model.parameters()) == ref["num_float_elements"] == 3_336_106_240
    for name, module in meta_model.named_modules():  # the router is a bare Parameter, not a Linear
        if name.endswith("mlp.gate"):
            assert not isinstance(module, torch.nn.Linear)


@pytest.mark.parametrize("targets", ["family_regex", "plain_names"])
def test_lora_r16_seven_modules_trains_77_509_632(meta_model, targets):
    kwargs = FAMILY.lora_targets(meta_model, SEVEN) if targets == "family_regex" else {"target_modules": SEVEN}
    peft_model = get_peft_model(copy.deepcopy(meta_model), LoraConfig(r=16, lora_alpha=16, **kwargs))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == 77_509_632
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert all(".model.layers." in n for n in adapted)
    assert not any(part in n for n in adapted for part in ("sam_model", "vision_model", "projector", "mlp.gate."))


def test_lora_regex_matches_only_language_model(meta_model):
    import re

    pattern = re.compile(FAMILY.lora_targets(meta_model, SEVEN)["target_modules"])
    matched = [n for n, _ in meta_model.named_modules() if pattern.fullmatch(n)]
    # 12 layers x 4 attention + layer-0 MLP 3 + 11 MoE layers x (64 experts + 1 shared) x 3
    assert len(matched) == 12 * 4 + 3 + 11 * 65 * 3
    assert all(n.startswith("model.layers.") for n in matched)
    only_attn = re.compile(FAMILY.lora_targets(meta_model, ["q_proj", "v_proj"])["target_modules"])
    assert sum(bool(only_attn.fullmatch(n)) for n, _ in meta_model.named_modules()) == 24
    with pytest.raises(ValueError, match="qkv"):
        FAMILY.lora_targets(meta_model, ["qkv"])


# ------------------------------------------------------------------------------------------------- I/O


def test_save_load_round_trip_is_strict(tiny_dir, tmp_path):
    model = FAMILY.load_model(str(tiny_dir))
    fresh = DeepseekOCRForCausalLM(tiny_config())
    assert set(model.state_dict()) == set(fresh.state_dict())
    stored = load_file(tiny_dir / "model.safetensors")
    assert set(stored) == set(fresh.state_dict())
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())
    assert json.loads((tiny_dir / "config.json").read_text())["model_type"] == "deepseek_vl_v2"

    model.save_pretrained(tmp_path / "again")
    assert set(load_file(tmp_path / "again" / "model.safetensors")) == set(stored)

    for case, edit in (("missing", lambda sd: sd.pop("model.layers.1.mlp.experts.3.up_proj.weight")),
                       ("unexpected", lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(2)))):
        broken = tmp_path / case
        broken.mkdir()
        (broken / "config.json").write_text((tiny_dir / "config.json").read_text())
        sd = dict(stored)
        edit(sd)
        save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
        key = "experts.3.up_proj" if case == "missing" else "model.extra.weight"
        with pytest.raises(ValueError, match=rf"{case} keys.*{key}"):
            FAMILY.load_model(str(broken))


# ------------------------------------------------------------------------------------------------- training


def test_vision_frozen_by_default_and_trainable_on_request(tiny_dir):
    model = _tiny_model(tiny_dir).train()
    vision = model.model.vision_parameters()
    assert vision and not any(p.requires_grad for p in vision)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("model.layers."))
    inputs, ids, labels = _image_sample(model)
    model(input_ids=ids, labels=labels, **FAMILY.collate_images([inputs])).loss.backward()
    assert model.model.sam_model.patch_embed.proj.weight.grad is None

    model = _tiny_model(tiny_dir, train_vision=True).train()
    assert all(p.requires_grad for p in model.model.vision_parameters())
    model(input_ids=ids, labels=labels, **FAMILY.collate_images([inputs])).loss.backward()
    for p in (model.model.sam_model.patch_embed.proj.weight, model.model.vision_model.transformer.layers[0].mlp.fc1.weight,
              model.model.projector.layers.weight, model.model.view_seperator):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_gradient_checkpointing_lora_input_require_grads(tiny_dir):
    model = _tiny_model(tiny_dir).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.model.embed_tokens.weight.requires_grad_(False)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **FAMILY.lora_targets(model, SEVEN)))
    inputs, ids, labels = _image_sample(model)
    out = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, use_cache=False,
                     **FAMILY.collate_images([inputs]))
    out.loss.backward()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n and "self_attn" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_loss_shift_num_items_and_train_eval_equal(tiny_dir):
    model = _tiny_model(tiny_dir).eval()
    inputs, ids, labels = _image_sample(model)
    pix = FAMILY.collate_images([inputs])
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, return_logits=True, **pix)
        manual = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
        assert out.logits.dtype == torch.float32
        torch.testing.assert_close(out.loss, manual, rtol=1e-5, atol=1e-6)
        assert model(input_ids=ids, labels=labels, **pix).logits is None  # loss-only rows by default
        halved = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(2 * len(ANSWER_IDS)), **pix)
        torch.testing.assert_close(halved.loss, out.loss / 2, rtol=1e-5, atol=1e-6)
        model.train()
        torch.testing.assert_close(model(input_ids=ids, labels=labels, **pix).loss, out.loss, rtol=1e-6, atol=1e-6)
        assert model(input_ids=ids, labels=labels, **pix).aux_loss is None  # balancing loss off by default
        model.config.add_aux_loss = True
        with_aux = model(input_ids=ids, labels=labels, **pix)
        assert with_aux.aux_loss > 0
        torch.testing.assert_close(with_aux.loss, out.loss + with_aux.aux_loss, rtol=1e-5, atol=1e-6)


def test_forward_walks_no_module_tree(tiny_dir, monkeypatch):
    """With LoRA on the experts the tree holds ~26,000 modules: a forward (every decoding step) must not
    walk it, the balancing loss included (its MoE blocks are found through the layers)."""
    model = _tiny_model(tiny_dir)
    model.config.add_aux_loss = True
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **FAMILY.lora_targets(model, SEVEN))).train()
    inputs, ids, labels = _image_sample(model)
    pix = FAMILY.collate_images([inputs])
    walks = []
    original = torch.nn.Module.named_modules

    def counted(self, *args, **kwargs):
        walks.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "named_modules", counted)  # modules() goes through it too
    out = peft_model(input_ids=ids, labels=labels, **pix)
    assert out.aux_loss > 0
    assert walks == []


# ------------------------------------------------------------------------------------------------- batching


def test_batched_rows_with_text_only_and_tiles_match_single_rows(tiny_dir):
    """Mixed batch (gundam with tiles, tiny-less text row) == each row alone; checks slot order per row."""
    model = _tiny_model(tiny_dir).eval()
    a, ids_a, lab_a = _image_sample(model, size=(1400, 64), mode="gundam")
    b, ids_b, lab_b = _image_sample(model, size=(300, 48), mode="gundam")
    assert a.tensors["pixel_values_local"].shape[0] > 0 and b.tensors["pixel_values_local"].shape[0] == 0
    text_ids = torch.tensor([[0] + PROMPT_IDS + ANSWER_IDS])
    rows = [(ids_a, a), (text_ids, None), (ids_b, b)]
    width = max(r[0].shape[1] for r in rows)
    ids = torch.full((3, width), 2)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, (r, _) in enumerate(rows):  # right padding, as for training
        ids[i, : r.shape[1]], mask[i, : r.shape[1]] = r[0], 1
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, **FAMILY.collate_images([a, b])).logits
        for i, (r, inputs) in enumerate(rows):
            pix = FAMILY.collate_images([inputs]) if inputs else {}
            single = model(input_ids=r, **pix).logits
            torch.testing.assert_close(batched[i, : r.shape[1]], single[0], rtol=1e-4, atol=1e-4)


def test_left_padded_batched_generate_equals_single(tiny_dir):
    model = _tiny_model(tiny_dir).eval()
    samples = [_image_sample(model, size=s, answer=False) for s in ((300, 48), (120, 200))]
    # Different prompt lengths: give the second row a longer instruction.
    rows = [samples[0][1][0], torch.cat([samples[1][1][0], torch.tensor([1880, 1418, 29941])])]
    rows.append(torch.tensor([0] + PROMPT_IDS))  # a text-only row
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), 2)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    gen = {"do_sample": False, "max_new_tokens": 12, "no_repeat_ngram_size": 3, "eos_token_id": 1,
           "pad_token_id": 2}
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask,
                                 **FAMILY.collate_images([s[0] for s in samples]), **gen)
        for i, r in enumerate(rows):
            pix = FAMILY.collate_images([samples[i][0]]) if i < len(samples) else {}
            single = model.generate(input_ids=r[None], attention_mask=torch.ones_like(r[None]), **pix, **gen)
            new_single = single[0, len(r):].tolist()
            new_batched = batched[i, width:].tolist()[: len(new_single)]
            assert new_batched == new_single, f"row {i}"
            assert len(new_single) > 1


def test_slot_feature_mismatch_raises(tiny_dir):
    model = _tiny_model(tiny_dir).eval()
    inputs, ids, labels = _image_sample(model)
    short = torch.cat([ids[:, :1], ids[:, 2:]], dim=1)  # one slot fewer than the 73 feature rows
    with pytest.raises(ValueError, match=r"72 slots.*73 feature rows"):
        model(input_ids=short, **FAMILY.collate_images([inputs]))
    with pytest.raises(ValueError, match="73 image slots .* pixel_values is None"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="pixel_values_local has 0"):
        model(input_ids=ids, pixel_values=inputs.tensors["pixel_values"], images_spatial_crop=torch.tensor([[2, 1]]))


def test_tiny_forward_backward_is_fast(tiny_dir):
    import time

    model = _tiny_model(tiny_dir).train()
    inputs, ids, labels = _image_sample(model)
    pix = FAMILY.collate_images([inputs])
    model(input_ids=ids, labels=labels, **pix).loss.backward()  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model(input_ids=ids, labels=labels, **pix).loss.backward()
        times.append(time.perf_counter() - start)
    # ~0.1-0.2 s on 2 idle cores; the bound only catches regressions (e.g. a full-size tower) on busy CI.
    assert min(times) < 3.0, times


def test_eager_equals_sdpa_and_bf16_runs(tiny_dir):
    inputs, ids, labels = _image_sample(_tiny_model(tiny_dir))
    pix = FAMILY.collate_images([inputs])
    with torch.no_grad():
        sdpa = FAMILY.load_model(str(tiny_dir), attn_implementation="sdpa").eval()
        eager = FAMILY.load_model(str(tiny_dir), attn_implementation="eager").eval()
        assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
        torch.testing.assert_close(sdpa(input_ids=ids, **pix).logits, eager(input_ids=ids, **pix).logits,
                                   rtol=1e-4, atol=1e-4)
        bf16 = FAMILY.load_model(str(tiny_dir), dtype=torch.bfloat16).eval()
        assert bf16.model.sam_model.pos_embed.dtype == torch.bfloat16
        out = bf16(input_ids=ids, labels=labels, return_logits=True, **pix)  # float32 pixels cast inside
        assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)

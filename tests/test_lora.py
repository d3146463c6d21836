"""LoRA: adapters start as the identity update, only they (and new heads) train, and saved directories hold the
merged weights that a plain GLM loads to the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openglm import GLMConfig, GLMModel
from openglm.lora import LoRALinear, LoRASettings, add_lora, merged_state_dict
from openglm.tasks.classifier import GLMForSequenceClassification


def _inputs(config: GLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, 10), generator=g)
    positions = torch.stack([torch.arange(10).expand(2, 10), torch.zeros(2, 10, dtype=torch.long)], dim=1)
    return ids, positions


def test_adapters_start_as_the_pretrained_model_and_only_they_train() -> None:
    torch.manual_seed(0)
    config = GLMConfig.from_name("tiny")
    model = GLMModel(config).eval()
    ids, positions = _inputs(config)
    before = model(ids, positions, attention_mask=4).logits
    frozen = {k: v.clone() for k, v in model.state_dict().items()}

    adapted = add_lora(model, LoRASettings(rank=4, alpha=8.0))
    assert adapted == 4 * config.num_layers
    torch.testing.assert_close(model(ids, positions, attention_mask=4).logits, before, rtol=0, atol=1e-6)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for name in trainable)

    targets = torch.randint(0, config.vocab_size, ids.shape, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):  # the adapters alone learn one batch of random targets
        logits = model(ids, positions, attention_mask=4).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Frozen random embeddings (std 0.02) bound the reachable logit margins, so the loss cannot go near 0.
    assert losses[-1] < losses[0] - 0.5
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # the pretrained weights never move


def test_merged_weights_load_into_a_plain_glm_with_the_same_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = GLMConfig.from_name("tiny")
    model = GLMModel(config).eval()
    add_lora(model, LoRASettings(rank=2, alpha=4.0, targets=("query_key_value", "dense_4h_to_h")))
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.05)  # a trained-looking update
    ids, positions = _inputs(config)
    expected = model(ids, positions, attention_mask=4).logits

    state = merged_state_dict(model)
    assert not any("lora" in key for key in state)
    assert set(state) == set(GLMModel(config).state_dict())
    model.save_pretrained(tmp_path / "merged")
    plain = GLMModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(plain(ids, positions, attention_mask=4).logits, expected, rtol=1e-5, atol=1e-5)


def test_classifier_head_stays_trainable_and_saves_merged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = GLMConfig.from_name("tiny")
    model = GLMForSequenceClassification(GLMModel(config), num_classes=3)
    add_lora(model, LoRASettings(rank=2))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"pool_layer.weight", "multichoice_head.weight"} <= trainable
    assert not any(name.startswith("model.") and "lora" not in name for name in trainable)
    model.save_pretrained(tmp_path / "cls")
    assert "lora" not in json.dumps(list(GLMModel.from_pretrained(tmp_path / "cls").state_dict()))


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="rank"):
        LoRASettings(rank=0)
    with pytest.raises(ValueError, match="targets"):
        LoRASettings(targets=("attention",))
    with pytest.raises(ValueError, match="no GLMModel"):
        add_lora(torch.nn.Linear(2, 2), LoRASettings())

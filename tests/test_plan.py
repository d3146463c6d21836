"""`openglm plan`: memory estimates per GPU answer for every preset and rank the setups sensibly."""

from __future__ import annotations

import pytest

from openglm.config import PRESETS, GLMConfig
from openglm.train.plan import GIB, estimate, parse_memory, plan


def test_parse_memory():
    assert parse_memory("80GB") == 80 * GIB
    assert parse_memory("40 GiB") == 40 * GIB
    assert parse_memory("512MB") == 0.5 * GIB
    assert parse_memory(24) == 24 * GIB
    with pytest.raises(ValueError, match="gpu_memory"):
        parse_memory("lots")


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_gets_an_answer(name):
    text = plan(name, gpus=8, gpu_memory="80GB", micro_batch_size=2)
    assert text.startswith(name) and "verdict:" in text
    assert text.count("\n") == 6  # header, column names, 4 setups, verdict


def test_glm_10b_needs_fsdp_on_8_gpus():
    text = plan("glm-10b", gpus=8, gpu_memory="80GB", micro_batch_size=1)
    assert "verdict: fits with FSDP" in text
    cfg = GLMConfig.from_name("glm-10b")
    ddp = estimate(cfg, "ddp", 8, 1, 1024)
    # fp32 weights + gradients + AdamW moments alone are 16 bytes per parameter: 158 GB for 9.9B.
    assert ddp.weights + ddp.gradients + ddp.optimizer >= 16 * cfg.num_parameters()
    assert ddp.total > 80 * GIB
    assert "does not fit" in plan("glm-10b", gpus=1, gpu_memory="80GB")


def test_estimates_move_the_right_way():
    cfg = GLMConfig.from_name("glm-large")
    base = estimate(cfg, "ddp", 8, 4, 512)
    assert estimate(cfg, "ddp", 8, 4, 512, checkpointing=True).activations < base.activations
    assert estimate(cfg, "ddp", 8, 8, 512).activations > base.activations
    assert estimate(cfg, "fsdp", 8, 4, 512).optimizer == pytest.approx(base.optimizer / 8)
    assert estimate(cfg, "fsdp", 16, 4, 512).total < estimate(cfg, "fsdp", 8, 4, 512).total
    assert estimate(cfg, "ddp", 8, 4, 512, precision="fp32").activations > base.activations
    with pytest.raises(ValueError, match="strategy"):
        estimate(cfg, "zero", 8, 4, 512)


def test_bad_sizes_name_the_flag():
    with pytest.raises(ValueError, match="seq_length=0 must be >= 1"):
        plan("glm-base", seq_length=0)
    with pytest.raises(ValueError, match="seq_length=100000 exceeds glm-base's max_sequence_length=512"):
        plan("glm-base", seq_length=100000)
    for memory in ("0GB", 0, "0"):
        with pytest.raises(ValueError, match="gpu_memory=.* must be positive"):
            plan("glm-base", gpu_memory=memory)
    with pytest.raises(ValueError, match="micro_batch_size=0 must be >= 1"):
        plan("glm-base", micro_batch_size=0)
    text = plan("all", seq_length=1024)  # presets with shorter positions say so instead of failing all
    assert "glm-base: skipped: seq_length=1024 exceeds" in text and "verdict: fits" in text

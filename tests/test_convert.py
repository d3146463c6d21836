"""Checkpoint layouts: official (MP=1 and MP=2), Hugging Face, ours; bit-exact round trips; clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.conftest import require, shared_data_dir

from openglm import GLMConfig, GLMModel
from openglm.cli import main as cli_main
from openglm.convert import CheckpointError, convert, load_checkpoint, merge_model_parallel


@pytest.fixture
def mp_case(reference):
    """The fixture config that ships model-parallel shards."""
    root = reference / "model"
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if (folder / "official_mp2").is_dir():
            return folder
    pytest.skip(f"no official_mp2 fixture under {root}")


def _logits(model: GLMModel, folder):
    inp = load_file(str(folder / "inputs.safetensors"))
    with torch.no_grad():
        return model.eval()(inp["input_ids"], inp["position_ids"], inp["sep"]).logits


def test_official_mp1_and_mp2_load_to_the_same_weights(mp_case):
    reference = load_file(str(mp_case / "weights.safetensors"))
    config = mp_case / "config.json"
    for layout in ("official", "official_mp2"):
        model = GLMModel.from_pretrained(require(mp_case / layout), config=config)
        for key, value in model.state_dict().items():
            assert torch.equal(value, reference[key]), (layout, key)
    expected = load_file(str(mp_case / "expected.safetensors"))["logits_sep_vector"]
    assert (_logits(model, mp_case) - expected).abs().max() < 1e-4


def test_every_fixture_official_dir_loads(reference):
    for folder in sorted(p for p in (reference / "model").iterdir() if (p / "official").is_dir()):
        model = GLMModel.from_pretrained(
            folder / "official", config=GLMConfig.from_file(folder / "config.json")
        )
        expected = load_file(str(folder / "expected.safetensors"))["logits_sep_vector"]
        assert (_logits(model, folder) - expected).abs().max() < 1e-4, folder.name


def test_official_needs_a_config(mp_case):
    with pytest.raises(CheckpointError, match="carry no config"):
        GLMModel.from_pretrained(mp_case / "official")


def test_hf_directory_with_glm_prefix_and_bin(tmp_path, mp_case):
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(mp_case / "config.json", hf / "config.json")
    state = {"glm." + k: v for k, v in load_file(str(mp_case / "weights.safetensors")).items()}
    torch.save(state, hf / "pytorch_model.bin")
    model = GLMModel.from_pretrained(hf)
    expected = load_file(str(mp_case / "expected.safetensors"))["logits_sep_vector"]
    assert (_logits(model, mp_case) - expected).abs().max() < 1e-4
    hf_st = tmp_path / "hf_st"
    hf_st.mkdir()
    shutil.copy(mp_case / "config.json", hf_st / "config.json")
    save_file(
        load_file(str(mp_case / "weights.safetensors")), str(hf_st / "model-00001-of-00001.safetensors")
    )
    assert torch.equal(GLMModel.from_pretrained(hf_st).word_embeddings.weight, model.word_embeddings.weight)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = GLMModel(GLMConfig.from_name("tiny", norm_scheme="deepnorm", activation="gelu_erf"))
    model.save_pretrained(tmp_path / "ckpt")
    loaded = GLMModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_merge_model_parallel_interleaves_qkv_thirds():
    full = torch.arange(12.0).view(12, 1)  # Q rows 0-3, K rows 4-7, V rows 8-11, 2 heads of 2 rows
    shard0 = torch.cat([full[0:2], full[4:6], full[8:10]])
    shard1 = torch.cat([full[2:4], full[6:8], full[10:12]])
    key = "transformer.layers.0.attention.query_key_value.weight"
    merged = merge_model_parallel([{key: shard0}, {key: shard1}])
    assert torch.equal(merged[key], full)


def test_cli_convert_official_mp2(tmp_path, mp_case, capsys):
    out = tmp_path / "converted"
    cli_main(
        ["convert", str(mp_case / "official_mp2"), str(out), "--model_config", str(mp_case / "config.json")]
    )
    assert json.loads((out / "config.json").read_text())["model_type"] == "openglm"
    assert torch.equal(
        GLMModel.from_pretrained(out).word_embeddings.weight,
        load_file(str(mp_case / "weights.safetensors"))["word_embeddings.weight"],
    )


def test_errors_name_the_file_and_key(tmp_path):
    torch.manual_seed(0)
    model = GLMModel(GLMConfig.from_name("tiny"))
    model.save_pretrained(tmp_path / "ok")
    weights = tmp_path / "ok" / "model.safetensors"

    truncated = tmp_path / "truncated"
    shutil.copytree(tmp_path / "ok", truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        GLMModel.from_pretrained(truncated)

    state = load_file(str(weights))
    bad_shape = tmp_path / "bad_shape"
    shutil.copytree(tmp_path / "ok", bad_shape)
    state_bad = dict(state)
    state_bad["transformer.final_layernorm.weight"] = torch.ones(3)
    save_file(state_bad, str(bad_shape / "model.safetensors"))
    with pytest.raises(CheckpointError, match="shape mismatch for 'transformer.final_layernorm.weight'"):
        GLMModel.from_pretrained(bad_shape)

    extra = tmp_path / "extra"
    shutil.copytree(tmp_path / "ok", extra)
    save_file({**state, "transformer.surprise": torch.ones(1)}, str(extra / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unknown key 'transformer.surprise'"):
        GLMModel.from_pretrained(extra)

    missing = tmp_path / "missing"
    shutil.copytree(tmp_path / "ok", missing)
    save_file(
        {k: v for k, v in state.items() if "final_layernorm.bias" not in k},
        str(missing / "model.safetensors"),
    )
    with pytest.raises(CheckpointError, match="missing key 'transformer.final_layernorm.bias'"):
        GLMModel.from_pretrained(missing)

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        GLMModel.from_pretrained(tmp_path / "nowhere")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    official = tmp_path / "official"
    (official / "release").mkdir(parents=True)
    (official / "latest_checkpointed_iteration.txt").write_text("release")
    torch.save({"module": {}, "payload": _Evil()}, official / "release" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(official, "tiny")


def test_position_table_extension(tmp_path):
    torch.manual_seed(0)
    small = GLMModel(GLMConfig.from_name("tiny", max_sequence_length=16))
    small.save_pretrained(tmp_path / "small")
    big = GLMModel.from_pretrained(
        tmp_path / "small", config=GLMConfig.from_name("tiny", max_sequence_length=32)
    )
    rows = small.transformer.position_embeddings.weight.shape[0]
    assert torch.equal(
        big.transformer.position_embeddings.weight[:rows], small.transformer.position_embeddings.weight
    )


def test_cli_error_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]


def test_presets_match_official_parameter_counts():
    # Spec A.10 sizes (README): 110M / 335M / 410M / 515M / 2B / 10B.
    millions = {
        name: GLMConfig.from_name(name).num_parameters() / 1e6
        for name in ("glm-base", "glm-large", "glm-410m", "glm-515m")
    }
    assert round(millions["glm-base"], 1) == 109.3
    assert round(millions["glm-large"], 1) == 334.7
    assert round(millions["glm-410m"], 1) == 410.3
    assert round(millions["glm-515m"], 1) == 514.6
    assert round(GLMConfig.from_name("glm-10b").num_parameters() / 1e9, 2) == 9.88


def test_config_validation_and_hf_config(tmp_path, mp_case):
    with pytest.raises(ValueError, match="hidden_size=65"):
        GLMConfig(hidden_size=65, num_attention_heads=4)
    with pytest.raises(ValueError, match="activation"):
        GLMConfig(activation="relu")
    with pytest.raises(ValueError, match="unknown GLM preset"):
        GLMConfig.from_name("glm-99b")
    cfg = GLMConfig.from_file(mp_case / "config.json")
    assert cfg.block_position_encoding and cfg.activation == "gelu_tanh"
    cfg.save(tmp_path / "c.json")
    assert GLMConfig.from_file(tmp_path / "c.json") == cfg
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"num_layers": 2, "surprise": 1}))
    with pytest.raises(ValueError, match="surprise"):
        GLMConfig.from_file(bad)


def test_convert_carries_the_tokenizer(tmp_path, mp_case, caplog):
    """A Hugging Face directory's GLM tokenizer is converted with the official ids of its released model; official
    checkpoints take one from --tokenizer; without any, the output holds the model only and says so."""
    from openglm.convert import find_tokenizer
    from openglm.tokenizer import GLMTokenizer

    vocab = require(shared_data_dir() / "tokenizers" / "bert-large-uncased-vocab.txt")
    hf = tmp_path / "hf"
    hf.mkdir()
    hf_config = json.loads((mp_case / "config.json").read_text())
    hf_config["vocab_size"] = 30592  # BERT's 30524 tokens, padded to 128
    (hf / "config.json").write_text(json.dumps(hf_config))
    torch.manual_seed(0)
    save_file(GLMModel(GLMConfig.from_file(hf / "config.json")).state_dict(), str(hf / "model.safetensors"))
    shutil.copy(vocab, hf / "vocab.txt")
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GLMBertTokenizer"}))
    out = convert(str(hf), str(tmp_path / "out"))
    official = GLMTokenizer.from_files("bert", vocab)
    carried = GLMTokenizer.from_pretrained(out)
    text = "Tsinghua University is located in [MASK]."
    assert carried.encode(text) == official.encode(text) and carried.command_tokens == official.command_tokens
    assert GLMModel.from_pretrained(out).config == GLMModel.from_pretrained(hf).config

    (hf / "tokenizer_config.json").unlink()
    with caplog.at_level("WARNING"):
        convert(str(hf), str(tmp_path / "bare"))
    assert (
        "carries no tokenizer" in caplog.text and not (tmp_path / "bare" / "tokenizer_config.json").exists()
    )
    convert(str(hf), str(tmp_path / "named"), tokenizer=f"bert:{vocab}")
    assert GLMTokenizer.from_pretrained(tmp_path / "named").encode(text) == official.encode(text)
    with pytest.raises(ValueError, match="30524 tokens but the model only"):  # the fixture model is tiny
        convert(
            str(mp_case / "official"),
            str(tmp_path / "small"),
            str(mp_case / "config.json"),
            None,
            f"bert:{vocab}",
        )

    # The Chinese class takes GLM-Large-Chinese's fixed command ids when the architecture is that model's.
    large_chinese = GLMConfig.from_name("glm-large-chinese")
    sp = require(shared_data_dir() / "tokenizers" / "cog-pretrain.model")
    zh = tmp_path / "zh"
    zh.mkdir()
    shutil.copy(sp, zh / "cog-pretrain.model")
    (zh / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GLMChineseTokenizer"}))
    expected = GLMTokenizer.for_model("glm-large-chinese", sp.parent)
    assert find_tokenizer(zh, large_chinese).command_tokens == expected.command_tokens
    (zh / "cog-pretrain.model").unlink()
    with pytest.raises(CheckpointError, match="cog-pretrain.model is missing"):
        find_tokenizer(zh, large_chinese)

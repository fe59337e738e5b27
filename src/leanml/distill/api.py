"""``leanml.distill``: build a student from the teacher, choose the training data, train it.

``distill(teacher, Distill(...), data)`` leaves the teacher untouched and returns the student's handle;
in a recipe (``kind: distill``) the model being compressed is the student and the teacher is the model
as it was before the recipe (``prune → distill → quantize``), unless ``student`` builds a new one.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..data import TensorData, TextCorpus
from ..errors import LeanmlError
from ..models.handle import ModelHandle, mean_pool
from ..prune.finetune import TEACHER_KEY, snapshot_teacher
from .config import Distill
from .select import dedup, select, teacher_scores
from .students import build_student
from .trainer import Items, init_distributed, train

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def text_chunks(docs: list[str], words: int) -> list[str]:
    """Documents cut at sentence ends into chunks of about ``words`` words (a longer sentence is one chunk)."""
    chunks: list[str] = []
    for doc in docs:
        current: list[str] = []
        count = 0
        for sentence in _SENTENCE.split(doc.strip()):
            n = len(sentence.split())
            if current and count + n > words:
                chunks.append(" ".join(current))
                current, count = [], 0
            current.append(sentence)
            count += n
        if current and count >= max(3, words // 4):
            chunks.append(" ".join(current))
    return chunks


def training_items(handle: ModelHandle, data, cfg: Distill) -> Items:
    """The training items for ``handle``'s task from the training split of ``data``."""
    if data is None:
        raise LeanmlError(f"distilling into {handle.name!r} needs training data; pass --data")
    if handle.task == "causal-lm":
        if not isinstance(data, TextCorpus):
            raise LeanmlError(f"distilling causal LM {handle.name!r} needs running text, not {type(data).__name__}")
        wins = [w for w in data.windows(handle.tokenizer, "train", cfg.window) if len(w) == cfg.window]
        if len(wins) < cfg.batch_size:
            raise LeanmlError(
                f"data {data.name!r} has {len(wins)} training windows of {cfg.window} tokens, fewer than "
                f"one batch of {cfg.batch_size}"
            )
        return Items("tokens", tokens=torch.stack(wins))
    if isinstance(data, TensorData):
        x, y = data.tensors("calib")
        return Items("tensors", x=x, y=y)
    if handle.tokenizer is not None and hasattr(data, "documents"):
        texts = text_chunks(data.documents("calib"), cfg.chunk_words)
        if len(texts) < cfg.batch_size:
            raise LeanmlError(f"data {data.name!r} gives {len(texts)} training texts, fewer than one batch of {cfg.batch_size}")
        return Items("texts", texts=texts)
    raise LeanmlError(f"cannot build training items for model {handle.name!r} from data {getattr(data, 'name', data)!r}")


def _item_texts(items: Items, handle: ModelHandle) -> list[str] | None:
    if items.kind == "texts":
        return items.texts
    if items.kind == "tokens" and hasattr(handle.tokenizer, "decode"):
        return [handle.tokenizer.decode(w) for w in items.tokens]
    return None


def _exact_rows(x: torch.Tensor) -> list[int]:
    seen, keep = set(), []
    for i, row in enumerate(x.reshape(len(x), -1)):
        key = row.numpy().tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def deduplicate(items: Items, handle: ModelHandle) -> Items:
    """Drop exact and near duplicates (MinHash over word shingles) of text items, exact duplicates of rows."""
    texts = _item_texts(items, handle)
    if texts is not None:
        keep, report = dedup(texts, near=True)
    else:
        keep = _exact_rows(items.tokens if items.kind == "tokens" else items.x)
        report = {"items": len(items), "exact_duplicates": len(items) - len(keep), "near_duplicates": 0, "kept": len(keep)}
    out = items.subset(keep)
    out.report["dedup"] = report
    return out


@torch.no_grad()
def _disagreement(student: ModelHandle, teacher: nn.Module, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Per text, ``1 - cos`` between the student's and the teacher's pooled embeddings."""
    scores = []
    was = student.module.training
    student.module.eval()
    for i in range(0, len(texts), batch_size):
        enc = dict(
            student.tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=student.max_length, return_tensors="pt"
            )
        )
        s = mean_pool(student.module(**enc), enc["attention_mask"])
        t = mean_pool(teacher(**enc), enc["attention_mask"])
        scores.append(1 - torch.nn.functional.cosine_similarity(s, t, dim=-1))
    student.module.train(was)
    return torch.cat(scores)


def choose(items: Items, cfg: Distill, student: ModelHandle, teacher: nn.Module | None) -> Items:
    """Keep ``cfg.select_fraction`` of the items ranked per ``cfg.select_by`` (see :class:`Distill`): scores
    are the teacher's loss on the item (its entropy without labels), or, for a text encoder, how much the
    student and the teacher disagree on it."""
    if cfg.select_fraction >= 1:
        return items
    if cfg.select_by == "random":
        scores = torch.zeros(len(items))
        kind = "none"
    elif teacher is None:
        raise LeanmlError(f"select_by {cfg.select_by!r} ranks items with the teacher; there is none (use random)")
    elif items.kind == "texts":
        scores, kind = _disagreement(student, teacher, items.texts), "student-teacher disagreement"
    else:
        t_handle = ModelHandle(module=teacher, task=student.task, name="teacher", tokenizer=student.tokenizer)
        kind = "loss" if items.kind == "tokens" or items.y is not None else "entropy"
        payload = list(items.tokens) if items.kind == "tokens" else (items.x, items.y)
        scores = teacher_scores(t_handle, payload, kind=kind)
    keep = select(scores, cfg.select_fraction, cfg.select_by, cfg.seed)
    out = items.subset(sorted(keep) if cfg.select_by != "curriculum" else keep)
    if cfg.select_by == "curriculum":
        out.order = list(range(len(keep)))
    out.report["selection"] = {
        "by": cfg.select_by,
        "score": kind,
        "fraction": cfg.select_fraction,
        "kept": len(keep),
        "of": len(items),
    }
    return out


def distill(
    teacher: ModelHandle,
    config: Distill,
    data=None,
    *,
    student: nn.Module | None = None,
    checkpoint_dir=None,
    resume: bool = False,
) -> ModelHandle:
    """Distil ``teacher`` into a student built per ``config.student`` (or the module ``student``) and
    return the student's handle; the teacher is not changed. ``checkpoint_dir`` + ``config.checkpoint_every``
    make the run resumable (``resume=True`` continues from the last checkpoint)."""
    from ..config import coerce_config
    from ..quantize.api import check_handle

    check_handle(teacher, "leanml.distill")
    config = coerce_config(config, (Distill,), "leanml.distill")
    if not teacher.is_torch or not isinstance(teacher.module, nn.Module):
        raise LeanmlError(f"teacher {teacher.name!r} runs on {teacher.runtime}; distil from a PyTorch model")
    init_distributed()
    spec = student if student is not None else (config.student or "same")
    torch.manual_seed(config.seed)
    made, report = build_student(teacher, spec, data, calib_windows=config.calib_windows, window=config.window)
    frozen = snapshot_teacher(teacher.module) if config.needs_teacher else None
    _fit(made, frozen, config, data, report, checkpoint_dir, resume)
    return made


def _fit(student: ModelHandle, teacher: nn.Module | None, cfg: Distill, data, report: dict, checkpoint_dir, resume) -> None:
    _check_student(student, teacher, cfg)
    items = training_items(student, data, cfg)
    if cfg.dedup:
        items = deduplicate(items, student)
    items = choose(items, cfg, student, teacher)
    result = train(
        student, teacher, cfg, items, layer_sources=report.get("layer_sources"), checkpoint_dir=checkpoint_dir, resume=resume
    )
    student.meta.setdefault("reports", {})["distill.json"] = {**report, **items.report, **result}
    student.meta["modified"] = True
    student.meta.setdefault("applied", []).append(cfg.model_dump())


def _check_student(student: ModelHandle, teacher: nn.Module | None, cfg: Distill) -> None:
    if teacher is None or "hidden" not in cfg.terms:
        return
    ws = getattr(getattr(student.module, "config", None), "hidden_size", None)
    wt = getattr(getattr(teacher, "config", None), "hidden_size", None)
    if ws is not None and wt is not None and ws > wt:
        raise LeanmlError(
            f"the student's hidden width {ws} is wider than the teacher's {wt}; a layer mapping needs a "
            "student no wider than its teacher"
        )


def apply_distill(handle: ModelHandle, cfg: Distill, data=None) -> ModelHandle:
    """Recipe step: the model being compressed is the student (or the base ``cfg.student`` builds one
    from), the model before the recipe is the teacher."""
    original = handle.meta.get(TEACHER_KEY)
    if cfg.student is None:
        if cfg.needs_teacher and original is None:
            raise LeanmlError(
                "a distill step without 'student' distils the model back towards the original, so it "
                "must follow a compression step in the recipe (or set student: drop-layers:0.5)"
            )
        _fit(handle, original, cfg, data, {"spec": "the model being compressed", "layer_sources": None}, None, False)
        return handle
    made, report = build_student(handle, cfg.student, data, calib_windows=cfg.calib_windows, window=cfg.window)
    teacher = original if original is not None else snapshot_teacher(handle.module)
    _fit(made, teacher if cfg.needs_teacher else None, cfg, data, report, None, False)
    handle.module = made.module
    handle.meta.setdefault("reports", {}).update(made.meta.get("reports", {}))
    handle.meta["modified"] = True
    handle.meta.setdefault("applied", []).append(cfg.model_dump())
    return handle


__all__ = ["apply_distill", "choose", "deduplicate", "distill", "text_chunks", "training_items"]

"""Scoring a checkpoint on a JSONL set: prompts from records, batched generation, answer metrics.

A record is a conversation in the training data format; its last assistant turn is the reference answer and
everything before it is the prompt. Optional fields: `"answers": [...]`, further references (e.g. the ten
human answers of VQAv2); `"id"`, the example's name in the predictions; `"meta": {"task": ...}`, a task
name for per-task scores (the generated demo set has one).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import time
from typing import Callable, Iterable, Sequence

import numpy as np

from qwen2vl_jax import metrics as M
from qwen2vl_jax import storage
from qwen2vl_jax.data.records import DataError, parse_record
from qwen2vl_jax.infer.config import GenerationConfig

# lmms-eval's post-prompt for short-answer VQA tasks (VQAv2, TextVQA, DocVQA, ChartQA, ...).
LMMS_POST_PROMPT = "Answer the question using a single word or phrase."
PROMPT_STYLES = ("plain", "lmms")


@dataclasses.dataclass
class Example:
    id: str
    source: str                 # "file:line"
    prompt: list[dict]          # canonical messages up to and including the last user turn
    references: list[str]
    question: str               # text of the last user turn (reports and the blind baseline)
    task: str | None = None     # meta.task of the record, for per-task scores

    @property
    def question_type(self) -> str:
        """The task, else the question's first three words (the VQA paper's question types)."""
        return self.task or " ".join(self.question.lower().split()[:3])


def _text(message: dict) -> str:
    return "".join(it["text"] for it in message["content"] if it["type"] == "text")


def with_prompt_style(messages: list[dict], style: str) -> list[dict]:
    """`lmms`: the lmms-eval post-prompt on a new line after the question (last user turn)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt_style {style!r}; choose one of {PROMPT_STYLES}")
    if style == "plain":
        return messages
    last = messages[-1]
    content = list(last["content"])
    if content and content[-1]["type"] == "text":
        content[-1] = {**content[-1], "text": content[-1]["text"].rstrip() + "\n" + LMMS_POST_PROMPT}
    else:
        content.append({"type": "text", "text": LMMS_POST_PROMPT})
    return messages[:-1] + [{**last, "content": content}]


def read_examples(path: str, prompt_style: str = "plain", limit: int | None = None,
                  on_error: Callable[[DataError], None] | None = None) -> list[Example]:
    """Examples of a JSONL file. A bad record raises `DataError("file:line: ...")`, or goes to `on_error`."""
    base = storage.dirname(storage.abspath(path))
    out = []
    try:
        f = storage.open(path, "r", encoding="utf-8")
    except OSError as e:
        reason = e.strerror or str(e).removeprefix(f"{path}: ")
        raise DataError(f"{path}: cannot open the evaluation data ({reason})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            source = f"{path}:{lineno}"
            try:
                out.append(_example(line, source, base, prompt_style))
            except DataError as e:
                if on_error is None:
                    raise
                on_error(e)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise DataError(f"{path}: no evaluation records")
    return out


def _example(line: str, source: str, base: str, prompt_style: str) -> Example:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{source}: not valid JSON ({e.msg} at column {e.colno})") from None
    record = parse_record(obj, source, base)
    messages = record.messages
    if messages[-1]["role"] != "assistant" or len(messages) < 2 or messages[-2]["role"] != "user":
        raise DataError(f"{source}: an evaluation record must end with a user turn and the assistant's reference "
                        "answer; the last assistant turn is the reference")
    references = [_text(messages[-1]).strip()]
    extra = obj.get("answers")
    if extra is not None:
        if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
            raise DataError(f"{source}: 'answers' must be a list of strings (extra reference answers)")
        references += [a.strip() for a in extra if a.strip() and a.strip() not in references]
    prompt = with_prompt_style(messages[:-1], prompt_style)
    meta = obj.get("meta")
    task = meta.get("task") if isinstance(meta, dict) else None
    return Example(str(obj.get("id", source)), source, prompt, references, _text(messages[-2]).strip(),
                   None if task is None else str(task))


def collate(encoded: Sequence[dict], pad_id: int) -> dict:
    """Encoded prompts -> one HF-style batch, left-padded (pixels concatenated in row order)."""
    length = max(len(e["input_ids"]) for e in encoded)
    ids = np.full((len(encoded), length), pad_id, np.int32)
    mask = np.zeros((len(encoded), length), np.int32)
    for r, e in enumerate(encoded):
        n = len(e["input_ids"])
        ids[r, length - n:], mask[r, length - n:] = e["input_ids"], 1
    batch = {"input_ids": ids, "attention_mask": mask}
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        grids = [e[grid] for e in encoded if len(e.get(grid, ()))]
        if grids:
            batch[pixels] = np.concatenate([e[pixels] for e in encoded if len(e.get(grid, ()))])
            batch[grid] = np.concatenate(grids)
    seconds = [e["second_per_grid_ts"] for e in encoded if len(e.get("second_per_grid_ts", ()))]
    if seconds:   # Qwen2.5-VL: one entry per video, in the videos' order
        batch["second_per_grid_ts"] = np.concatenate(seconds)
    return batch


def answer(tokens: np.ndarray, eos: Iterable[int], processor) -> tuple[str, int]:
    """(text of the generated tokens before the first stop token, tokens generated including that stop)."""
    stops = np.flatnonzero(np.isin(tokens, list(eos)))
    n = int(stops[0]) if len(stops) else len(tokens)
    return processor.decode(tokens[:n], skip_special_tokens=True).strip(), min(n + 1, len(tokens))


def majority_baseline(examples: Sequence[Example], names: Sequence[str],
                      prior: Sequence[Example] | None = None) -> dict:
    """Chance level: the scores of answering every question, without looking at it, with the most common
    reference answer of its question type in `prior` (the "per Q-type prior" of the VQA paper). `prior` is
    the training set when known; by default the evaluation set itself, which flatters small question types.
    A type that `prior` lacks gets the most common answer overall."""
    prior = examples if prior is None else prior
    by_type = collections.defaultdict(collections.Counter)
    for ex in prior:
        by_type[ex.question_type][ex.references[0]] += 1
    overall = sum(by_type.values(), collections.Counter()).most_common(1)[0][0]
    guess = {q: c.most_common(1)[0][0] for q, c in by_type.items()}
    return M.aggregate([M.score_all(guess.get(ex.question_type, overall), ex.references, names)
                        for ex in examples], names)


@dataclasses.dataclass
class Report:
    predictions: list[dict]
    metrics: dict


def evaluate(model, processor, examples: Sequence[Example], cfg: GenerationConfig, batch_size: int = 8,
             names: Sequence[str] = tuple(M.METRICS), seed: int = 0, progress: bool = True,
             prior: Sequence[Example] | None = None,
             on_error: Callable[[DataError], None] | None = None) -> Report:
    """Generate an answer for every example (batches of `batch_size`, padded to that size so one shape is
    compiled per length bucket) and score it. The next batch is tokenised and patchified on a host thread
    while the device generates. `prior`: examples to fit the majority baseline on (see there). An example
    that fails to encode (an image that does not decode) raises its `DataError`, or, with `on_error`, is
    handed to it and left out of the predictions and scores."""
    from qwen2vl_jax.infer import generator_for
    gen = generator_for(model)
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]

    def encode(batch):
        enc, kept = [], []
        for ex in batch:
            try:
                enc.append(processor.encode_example(ex.prompt, require_assistant=False, add_generation_prompt=True,
                                                    source=ex.source))
                kept.append(ex)
            except DataError as e:
                if on_error is None:
                    raise
                on_error(e)
        return (collate(enc, processor.pad_token_id) if enc else None), kept

    bar = _progress(len(examples), progress)
    predictions, kept, new_tokens, start = [], [], 0, time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(encode, batches[0])
        for i, batch in enumerate(batches):
            inputs, batch = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(encode, batches[i + 1])
            bar.update(len(batches[i]) - len(batch))
            if inputs is None:
                continue
            kept.extend(batch)
            prompt = gen.prepare(**inputs, min_rows=batch_size)
            out = gen.generate(model.params, prompt, cfg, seed=seed + i)
            length = inputs["input_ids"].shape[1]
            for ex, row in zip(batch, out.sequences[:, length:]):
                text, n = answer(row, cfg.eos_token_id, processor)
                new_tokens += n
                predictions.append({"id": ex.id, "question": ex.question, "prediction": text,
                                    "references": ex.references, **M.score_all(text, ex.references, names)})
            bar.update(len(batch))
    bar.close()
    if not kept:
        raise DataError("no example could be encoded; see the errors above")
    examples, seconds = kept, time.perf_counter() - start
    summary = M.aggregate(predictions, names)
    summary["majority_baseline"] = majority_baseline(examples, names, prior)
    tasks = sorted({ex.task for ex in examples if ex.task is not None})
    if tasks:
        summary["by_task"] = {}
        for t in tasks:
            rows = [i for i, ex in enumerate(examples) if ex.task == t]
            summary["by_task"][t] = {**M.aggregate([predictions[i] for i in rows], names),
                                     "majority_baseline": majority_baseline([examples[i] for i in rows], names,
                                                                            prior)}
    summary.update(seconds=round(seconds, 2), generated_tokens=new_tokens,
                   examples_per_s=round(len(examples) / seconds, 3))
    return Report(predictions, summary)


def _progress(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, unit="ex", desc="eval", dynamic_ncols=True)
        except ImportError:
            pass
    return _NoBar()


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def write_report(report: Report, out_dir: str, extra: dict | None = None) -> tuple[str, str]:
    """`predictions.jsonl` (one line per example) and `metrics.json` in `out_dir`; returns their paths."""
    pred_path, metrics_path = storage.join(out_dir, "predictions.jsonl"), storage.join(out_dir, "metrics.json")
    storage.write_text(pred_path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in report.predictions))
    storage.write_text(metrics_path, json.dumps({**report.metrics, **(extra or {})}, indent=2, ensure_ascii=False)
                       + "\n")
    return pred_path, metrics_path

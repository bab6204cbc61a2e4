"""Measuring one condition over a list of samples: answers, divergences, spectra, kept tokens.

``run_condition`` is the unit of work of ``analysis.compare``: the baseline (``method=None``) or one
(method, keep) over every sample, in batches. For each batch it greedily generates under
``lofi.pruned`` with ``analysis.capture.Capture`` active (the prompt's forward pass is captured once),
keeps the first-answer-position logits, and for pruned conditions teacher-forces the baseline's answer
under the very kept sets the answer was generated with (``handle.replay()``) to get the forced KL. Everything returned is small: per-sample rows and per-layer statistics.
"""

from __future__ import annotations

from contextlib import nullcontext
import json
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

import lofi
from analysis.study.models import batch_inputs
from lofi.families import family_class
from analysis.measure.capture import Capture
from analysis.measure.consistency import forced_kl, js_divergence, kl_divergence, normalize_answer


@dataclass
class BaselineOutputs:
    """What every pruned condition is compared with, per sample (kept in memory and on disk)."""

    answers: list[str]
    first_logits: torch.Tensor                    # [N, vocab] float32
    sequences: list[list[int]]                    # prompt ids + generated ids, unpadded
    answer_lengths: list[int]                     # answer tokens before EOS
    forced_logits: list[torch.Tensor] = field(default_factory=list)  # per sample [answer_len, vocab]


def _prompt_inputs(processor, samples, device):
    return batch_inputs(processor, samples).to(device)


def _geometry(model, inputs) -> list[dict]:
    """Per sample: its image (the family's description, JSON), visual and text token counts, and where its
    visual tokens lie on the image (``tiles``, JSON): what FLOPs and kept-token maps need."""
    family = family_class(model.config)
    valid = inputs["attention_mask"].bool()
    n_visual = (family(model).visual_mask(inputs["input_ids"]) & valid).sum(1).tolist()
    out = []
    for b, visual in enumerate(n_visual):
        image = family.image_of(inputs, b)
        tiles = [asdict(t) for t in family.tiles(model.config, image)]
        out.append({"image": json.dumps(image), "n_visual": visual, "n_text": int(valid[b].sum()) - visual,
                    "tiles": json.dumps(tiles)})
    return out


def _answer_length(tokens: list[int], stop: set[int]) -> int:
    for i, t in enumerate(tokens):
        if t in stop:
            return i
    return len(tokens)


@torch.no_grad()
def run_condition(model, processor, samples, *, method: str | None, keep: float, seed: int,
                  batch_size: int, max_new_tokens: int, baseline: BaselineOutputs | None,
                  capture_options: dict, progress: bool = True, desc: str = ""):
    """Returns (per-sample dict rows, LayerStatistics rows with sample ids, kept rows, BaselineOutputs|None)."""
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    stop = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    rows, spectra, kept_rows = [], [], []
    first_logits, answers, sequences, lengths, forced, geometry = [], [], [], [], [], []
    options = {"keep": keep}
    if method == "random":
        options["seed"] = seed
    with Capture(model, **capture_options) as capture:
        for start in tqdm(range(0, len(samples), batch_size), desc=desc, disable=not progress, leave=False):
            batch = samples[start:start + batch_size]
            inputs = _prompt_inputs(processor, batch, device)
            prompt_len = inputs["input_ids"].shape[1]
            context = lofi.pruned(model, method, **options) if method else nullcontext()
            with context as handle:
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)
            stats = capture.take()
            for r in stats:
                r.sample_id = batch[r.row].question_id
            spectra += stats
            new = out.sequences[:, prompt_len:]
            batch_answers = tokenizer.batch_decode(new, skip_special_tokens=True)
            step_logits = torch.stack(out.logits, 1).float()  # [B, steps, vocab]
            shapes = _geometry(model, inputs)
            if handle is not None:
                replay = handle.replay()  # the forced pass must see the tokens the answer was made with
                for b, n_prunable in enumerate(handle.n_prunable.tolist()):
                    shapes[b]["n_prunable"] = n_prunable
                for stage in range(len(handle.kept)):
                    for b, (s, kept) in enumerate(zip(batch, handle.kept_lists(stage))):
                        kept_rows.append({"sample_id": s.question_id, "method": method, "keep": keep,
                                          "stage": stage, "layer": handle.stages[stage], "kept": kept,
                                          "n_visual": shapes[b]["n_visual"], "tiles": shapes[b]["tiles"]})
            geometry += shapes
            for b, s in enumerate(batch):
                length = _answer_length(new[b].tolist(), stop)
                answers.append(batch_answers[b])
                first_logits.append(step_logits[b, 0].cpu())
                if baseline is None:
                    valid = inputs["attention_mask"][b].bool()
                    sequences.append(inputs["input_ids"][b][valid].tolist() + new[b, :length].tolist())
                    lengths.append(length)
                    forced.append(step_logits[b, :length].cpu())
            if baseline is not None:
                with capture.paused():
                    forced += _forced_logits(model, processor, batch, baseline, range(start, start + len(batch)),
                                             new, step_logits, replay)
    first = torch.stack(first_logits)
    if baseline is None:
        result = BaselineOutputs(answers, first, sequences, lengths, forced)
        for s, a, g in zip(samples, answers, geometry):
            rows.append(_row(s, "baseline", 1.0, a, a, g))
        return rows, spectra, kept_rows, result
    kl = kl_divergence(baseline.first_logits, first)
    js = js_divergence(baseline.first_logits, first)
    for i, (s, a, g) in enumerate(zip(samples, answers, geometry)):
        row = _row(s, method, keep, a, baseline.answers[i], g)
        n = baseline.answer_lengths[i]
        row["kl"], row["js"] = float(kl[i]), float(js[i])
        row["forced_kl"] = float(forced_kl(baseline.forced_logits[i][None], forced[i][None],
                                           torch.ones(1, n))[0]) if n else 0.0
        rows.append(row)
    return rows, spectra, kept_rows, None


def _row(sample, method, keep, answer, baseline_answer, geometry: dict) -> dict:
    gold = sample.answer
    norm = normalize_answer
    return {"sample_id": sample.question_id, "method": method, "keep": keep, "family": sample.family,
            "question": sample.question, "gold": gold, "answer": norm(answer),
            "baseline_answer": norm(baseline_answer),
            "correct": None if gold is None else norm(answer) == norm(gold),
            "baseline_correct": None if gold is None else norm(baseline_answer) == norm(gold),
            "flip": norm(answer) != norm(baseline_answer), "kl": 0.0, "forced_kl": 0.0, "js": 0.0,
            "image": geometry["image"], "n_visual": geometry["n_visual"], "n_text": geometry["n_text"],
            "n_prunable": geometry.get("n_prunable", geometry["n_visual"])}


def _forced_logits(model, processor, batch, baseline, index, generated, step_logits, replay) -> list[torch.Tensor]:
    """Per sample, [n, vocab]: the pruned model's logits predicting each of the n tokens of the baseline's
    answer, read with the kept sets the answer was generated with.

    Position j depends on the answer tokens before j only. Where the generation itself produced the
    baseline's first n-1 tokens, its step logits are exactly these. Otherwise the baseline's answer is
    teacher-forced after a replayed prefill (``replay``: pruning again on prompt + answer would choose
    from the answer too). Position 0, the distribution after the prompt, is always the generation's.
    """
    out, redo = [], []
    for b, i in enumerate(index):
        n = baseline.answer_lengths[i]
        answer = baseline.sequences[i][len(baseline.sequences[i]) - n:]
        out.append(step_logits[b, :n].cpu())
        if n > 1 and generated[b, :n - 1].tolist() != answer[:n - 1]:
            redo.append((b, answer))
    if redo:
        rows = [b for b, _ in redo]
        continued = _teacher_forced(model, processor, [batch[b] for b in rows], [a[:-1] for _, a in redo],
                                    replay.subset(rows))
        for (b, answer), logits in zip(redo, continued):
            out[b] = torch.cat([step_logits[b, :1].cpu(), logits[:len(answer) - 1].cpu()])
    return out


def _teacher_forced(model, processor, samples, continuations, replay) -> torch.Tensor:
    """[batch, max length, vocab]: logits after each token of ``continuations`` (right-padded), read
    after the samples' prompts under ``replay``'s kept sets."""
    device = next(model.parameters()).device
    inputs = _prompt_inputs(processor, samples, device)
    width = max(map(len, continuations))
    ids = torch.full((len(samples), width), processor.tokenizer.pad_token_id or 0, device=device)
    mask = torch.zeros_like(ids)
    for b, tokens in enumerate(continuations):
        ids[b, :len(tokens)] = torch.tensor(tokens, device=device)
        mask[b, :len(tokens)] = 1
    with lofi.pruned(model, replay):
        prefill = model(**inputs, use_cache=True, logits_to_keep=1)
        return model(input_ids=ids, attention_mask=torch.cat([inputs["attention_mask"], mask], 1),
                     past_key_values=prefill.past_key_values, use_cache=True).logits.float()

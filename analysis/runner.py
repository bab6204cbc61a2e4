"""Measuring one condition over a list of samples: answers, divergences, spectra, kept tokens.

``run_condition`` is the unit of work of ``analysis.compare``: the baseline (``method=None``) or one
(method, keep) over every sample, in batches. For each batch it greedily generates under
``lofi.pruned`` with ``analysis.capture.Capture`` active (the prompt's forward pass is captured once),
keeps the first-answer-position logits, and for pruned conditions teacher-forces the baseline's answer
under the very kept sets the answer was generated with (``handle.replay()``) to get the forced KL. Everything returned is small: per-sample rows and per-layer statistics.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import lofi
from analysis import bundled
from analysis.capture import Capture
from analysis.consistency import forced_kl, js_divergence, kl_divergence, normalize_answer


@dataclass
class BaselineOutputs:
    """What every pruned condition is compared with, per sample (kept in memory and on disk)."""

    answers: list[str]
    first_logits: torch.Tensor                    # [N, vocab] float32
    sequences: list[list[int]]                    # prompt ids + generated ids, unpadded
    answer_lengths: list[int]                     # answer tokens before EOS
    forced_logits: list[torch.Tensor] = field(default_factory=list)  # per sample [answer_len, vocab]


def _prompt_inputs(processor, samples, device):
    images = [s.load_image() for s in samples]
    processor.tokenizer.padding_side = "left"
    text = [bundled.prompt(s.question) for s in samples]
    return processor(images=images, text=text, return_tensors="pt", padding=True).to(device)


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
    first_logits, answers, sequences, lengths, forced = [], [], [], [], []
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
            if handle is not None:
                replay = handle.replay()  # the forced pass must see the tokens the answer was made with
                n_visual = handle.n_visual.tolist()
                for stage in range(len(handle.kept)):
                    for b, (s, kept) in enumerate(zip(batch, handle.kept_lists(stage))):
                        kept_rows.append({"sample_id": s.question_id, "method": method, "keep": keep,
                                          "stage": stage, "layer": handle.stages[stage],
                                          "kept": kept, "n_visual": n_visual[b]})
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
        for s, a in zip(samples, answers):
            rows.append(_row(s, "baseline", 1.0, a, a))
        return rows, spectra, kept_rows, result
    kl = kl_divergence(baseline.first_logits, first)
    js = js_divergence(baseline.first_logits, first)
    for i, (s, a) in enumerate(zip(samples, answers)):
        row = _row(s, method, keep, a, baseline.answers[i])
        n = baseline.answer_lengths[i]
        row["kl"], row["js"] = float(kl[i]), float(js[i])
        row["forced_kl"] = float(forced_kl(baseline.forced_logits[i][None], forced[i][None],
                                           torch.ones(1, n))[0]) if n else 0.0
        rows.append(row)
    return rows, spectra, kept_rows, None


def _row(sample, method, keep, answer, baseline_answer) -> dict:
    gold = sample.answer
    norm = normalize_answer
    return {"sample_id": sample.question_id, "method": method, "keep": keep, "family": sample.family,
            "question": sample.question, "gold": gold, "answer": norm(answer),
            "baseline_answer": norm(baseline_answer),
            "correct": None if gold is None else norm(answer) == norm(gold),
            "baseline_correct": None if gold is None else norm(baseline_answer) == norm(gold),
            "flip": norm(answer) != norm(baseline_answer), "kl": 0.0, "forced_kl": 0.0, "js": 0.0}


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

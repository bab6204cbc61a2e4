"""Measuring one condition over a list of samples: answers, divergences, spectra, kept tokens.

``run_condition`` is the unit of work of ``analysis.compare``: the unpruned model (``method=None``) or one
built method over every sample, in batches. For each batch it greedily generates under ``lofi.pruned``
with ``Capture`` active (the prompt's forward pass is captured once), keeps the first-answer-position
logits, and for pruned conditions scores the unpruned answer under the very kept sets the answer was
generated with (``handle.replay()``) to get the forced KL. Everything returned is small: typed
per-sample records (``analysis.study.records``) and per-layer statistics.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

import lofi
from analysis.measure.capture import Capture, CaptureOptions
from analysis.measure.consistency import forced_kl, js_divergence, kl_divergence, normalize_answer
from analysis.study.models import batch_inputs
from analysis.study.records import BaselineOutputs, Condition, ConditionResult, KeptTokens, SampleResult
from lofi.families import family_class


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
        out.append({"image": json.dumps(image), "n_visual": visual, "n_prunable": visual,
                    "n_text": int(valid[b].sum()) - visual, "tiles": json.dumps(tiles)})
    return out


def _answer_length(tokens: list[int], stop: set[int]) -> int:
    for i, t in enumerate(tokens):
        if t in stop:
            return i
    return len(tokens)


@torch.no_grad()
def run_condition(model, processor, samples, *, method: lofi.PruningMethod | None, batch_size: int,
                  max_new_tokens: int, baseline: BaselineOutputs | None, capture: CaptureOptions | None = None,
                  progress: bool = True, desc: str = "") -> ConditionResult:
    """One condition over ``samples``: the unpruned model when ``method`` is None (its result carries the
    ``BaselineOutputs`` the others need), else ``method`` (built once) compared with ``baseline``."""
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    stop = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    result = ConditionResult([], [], [])
    answers, first_logits, forced, geometry = [], [], [], []
    sequences, lengths = [], []
    with Capture(model, capture) as capturing:
        for start in tqdm(range(0, len(samples), batch_size), desc=desc, disable=not progress, leave=False):
            batch = samples[start:start + batch_size]
            inputs = _prompt_inputs(processor, batch, device)
            capturing.identify([s.question_id for s in batch])  # the spectra subset is chosen by id
            with lofi.pruned(model, method) if method else nullcontext() as handle:
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)
            # one device-to-host copy per batch of what the per-sample loops below read
            new = out.sequences[:, inputs["input_ids"].shape[1]:].cpu()
            step_logits = torch.stack(out.logits, 1).float().cpu()  # [B, steps, vocab]
            shapes = _geometry(model, inputs)
            if handle is not None:
                result.kept += _kept_tokens(handle, batch, shapes)
            geometry += shapes
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
            first_logits += list(step_logits[:, 0])
            if baseline is None:
                prompts, valid = inputs["input_ids"].cpu(), inputs["attention_mask"].bool().cpu()
                for b in range(len(batch)):
                    length = _answer_length(new[b].tolist(), stop)
                    sequences.append(prompts[b][valid[b]].tolist() + new[b, :length].tolist())
                    lengths.append(length)
                    forced.append(step_logits[b, :length])
            else:
                with capturing.paused():
                    forced += _forced_logits(model, processor, batch, baseline, range(start, start + len(batch)),
                                             new, step_logits, handle.replay())
            # taken last: spectra decomposed on the host (on a GPU) ran while this batch decoded and was scored;
            # each record carries the sample id given to identify
            result.spectra += capturing.take()
    first = torch.stack(first_logits)
    condition = Condition.of(method)
    if baseline is None:
        result.baseline = BaselineOutputs(answers, first, sequences, lengths, forced)
        result.samples = [_sample(s, condition, a, a, g) for s, a, g in zip(samples, answers, geometry)]
        return result
    kl, js = kl_divergence(baseline.first_logits, first), js_divergence(baseline.first_logits, first)
    for i, (s, a, g) in enumerate(zip(samples, answers, geometry)):
        n = baseline.answer_lengths[i]
        record = _sample(s, condition, a, baseline.answers[i], g)
        record.kl, record.js = float(kl[i]), float(js[i])
        record.forced_kl = float(forced_kl(baseline.forced_logits[i][None], forced[i][None],
                                           torch.ones(1, n))[0]) if n else 0.0
        result.samples.append(record)
    return result


def _kept_tokens(handle, batch, shapes) -> list[KeptTokens]:
    """The handle's kept tokens as records; the samples' prunable counts go into ``shapes``."""
    for b, n_prunable in enumerate(handle.n_prunable.tolist()):
        shapes[b]["n_prunable"] = n_prunable
    condition = Condition.of(handle.method)
    records = []
    for stage in range(len(handle.kept)):
        merged = handle.merged[stage] if stage < len(handle.merged) else None
        pairs = None if merged is None or merged.into is None else merged.into.tolist()
        for b, (s, kept) in enumerate(zip(batch, handle.kept_lists(stage))):
            moved = [(source, target) for source, target in (pairs[b] if pairs else []) if 0 <= target != source]
            records.append(KeptTokens(s.question_id, condition.method, condition.keep, stage, handle.stages[stage],
                                      kept, shapes[b]["n_visual"], shapes[b]["tiles"], [p for p, _ in moved],
                                      [t for _, t in moved]))
    return records


def _sample(sample, condition: Condition, answer: str, baseline_answer: str, geometry: dict) -> SampleResult:
    gold, norm = sample.answer, normalize_answer
    return SampleResult(
        sample_id=sample.question_id, method=condition.method, keep=condition.keep, family=sample.family,
        question=sample.question,
        gold=gold, answer=norm(answer), baseline_answer=norm(baseline_answer),
        correct=None if gold is None else norm(answer) == norm(gold),
        baseline_correct=None if gold is None else norm(baseline_answer) == norm(gold),
        flip=norm(answer) != norm(baseline_answer), image=geometry["image"], n_visual=geometry["n_visual"],
        n_prunable=geometry["n_prunable"], n_text=geometry["n_text"])


def _forced_logits(model, processor, batch, baseline, index, generated, step_logits, replay) -> list[torch.Tensor]:
    """Per sample, [n, vocab] on the host: the pruned model's logits predicting each of the n tokens of the
    baseline's answer, read with the kept sets the answer was generated with (``generated`` and
    ``step_logits``: the generation's tokens and logits, on the host).

    Position j depends on the answer tokens before j only. Where the generation itself produced the
    baseline's first n-1 tokens, its step logits are exactly these. Otherwise the baseline's answer is
    teacher-forced after a replayed prefill (``replay``: pruning again on prompt + answer would choose
    from the answer too). Position 0, the distribution after the prompt, is always the generation's.
    """
    out, redo = [], []
    for b, i in enumerate(index):
        n = baseline.answer_lengths[i]
        answer = baseline.sequences[i][len(baseline.sequences[i]) - n:]
        out.append(step_logits[b, :n])
        if n > 1 and generated[b, :n - 1].tolist() != answer[:n - 1]:
            redo.append((b, answer))
    if redo:
        rows = [b for b, _ in redo]
        continued = _teacher_forced(model, processor, [batch[b] for b in rows], [a[:-1] for _, a in redo],
                                    replay.subset(rows)).cpu()
        for (b, answer), logits in zip(redo, continued):
            out[b] = torch.cat([step_logits[b, :1], logits[:len(answer) - 1]])
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
    # positions as generate() numbers them: a left-padded row from its first real token (the model's own rule,
    # M-RoPE included), the continuation after its prompt's last position
    positions = model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))
    after = positions[..., -1:] + torch.arange(1, width + 1, device=device)
    with lofi.pruned(model, replay):
        prefill = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
        return model(input_ids=ids, attention_mask=torch.cat([inputs["attention_mask"], mask], 1),
                     position_ids=after, past_key_values=prefill.past_key_values, use_cache=True).logits.float()

"""LVPruning: decision modules, training touches only them, kept counts, keep-all, save/load, the
training-time masks equal true dropping of the same tokens, and top-k training decides as inference."""

import math

import numpy as np
import pytest
import torch
from _tiny import N_VISUAL, make_inputs, positions, prompt_ids, tiny_llava

import lofi
from lofi.methods.lvpruning import DecisionModules, LVPruning, decision_flops, sample_without_replacement, stage_layers
from lofi.training.lvpruning import masked_attention, ratio_loss, soft_pruning, topk_decisions


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def modules_dir(model, tmp_path_factory):
    torch.manual_seed(0)
    modules = DecisionModules.for_model(model)
    return modules.save(tmp_path_factory.mktemp("lvp") / "lvpruning")


def test_stage_layers_follow_the_papers_relative_depths():
    assert stage_layers(32) == [1, 8, 16]
    assert stage_layers(8) == [1, 2, 4]
    assert stage_layers(4) == [1, 2, 3]
    with pytest.raises(ValueError, match="too shallow"):
        stage_layers(3)


def test_a_training_step_changes_only_the_decision_modules(model):
    torch.manual_seed(0)
    modules = DecisionModules.for_model(model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in modules.state_dict().items()}
    for p in model.parameters():
        p.requires_grad_(False)
    inputs = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7, 8))])
    labels = inputs["input_ids"].clone()
    optimizer = torch.optim.AdamW(modules.parameters(), lr=1e-2)
    with soft_pruning(model, modules) as state:
        causal = model(**inputs, labels=labels).loss
    assert len(state.decisions) == 3 and state.decisions[0].shape == (2, N_VISUAL)
    loss = causal + 2 * ratio_loss(state.decisions, [0.5, 0.3, 0.1])
    loss.backward()
    optimizer.step()
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())
    changed = [k for k, v in modules.state_dict().items() if not torch.equal(before[k], v)]
    assert any(k.startswith("stages.0.") for k in changed) and any(k.startswith("stages.2.") for k in changed)
    assert model.config.text_config._attn_implementation == "sdpa"  # restored
    for p in model.parameters():
        p.requires_grad_(True)


def test_masked_attention_is_eq_9_with_a_bounded_gradient_at_dropped_keys():
    torch.manual_seed(0)
    q, k, d = 5, 7, 3
    scores = torch.randn(1, 1, q, k, dtype=torch.float64) * 3
    scores[..., 1] += 30  # every query attends almost only to key 1, which is dropped
    value, upstream = torch.randn(1, 1, k, d, dtype=torch.float64), torch.randn(1, 1, q, d, dtype=torch.float64)
    m = torch.tensor([1.0, 0, 1, 0, 1, 1, 0], dtype=torch.float64).expand(1, 1, q, k).clone().requires_grad_()
    out, probs = masked_attention(scores, m, value)
    (out * upstream).sum().backward()

    eq9_m = m.detach().clone().requires_grad_()
    p = scores.softmax(-1)
    eq9 = (p * eq9_m / (p * eq9_m).sum(-1, keepdim=True)) @ value
    (eq9 * upstream).sum().backward()
    torch.testing.assert_close(out, eq9)
    kept = m[0, 0, 0] == 1
    torch.testing.assert_close(m.grad[..., kept], eq9_m.grad[..., kept], rtol=1e-5, atol=1e-9)
    assert eq9_m.grad[..., ~kept].abs().max() > 1e8  # eq. 9's own derivative at a dropped, attended key
    p, mask = p[0, 0].numpy(), m.detach()[0, 0].numpy()
    v, g, outs = value[0, 0].numpy(), upstream[0, 0].numpy(), eq9[0, 0].detach().numpy()
    for j in np.flatnonzero(mask[0] == 0):  # reference: the attention key j gets when it is kept again
        readded = mask.copy()
        readded[:, j] = 1
        attention = p * readded / (p * readded).sum(-1, keepdims=True)
        reference = sum(attention[i, j] * (v[j] - outs[i]) @ g[i] for i in range(q))
        assert m.grad[0, 0, :, j].sum().item() == pytest.approx(reference, rel=1e-6)
        assert abs(reference) < 10


def test_masked_attention_is_exact_where_the_kept_keys_underflow():
    scores = torch.tensor([[[[0.0, 200.0, 0.0]]]])  # float32: exp(-200) of the mass is left on keys 0, 2
    out, probs = masked_attention(scores, torch.tensor([[[[1.0, 0.0, 1.0]]]]), torch.eye(3)[None, None])
    torch.testing.assert_close(probs, torch.tensor([[[[0.5, 0.0, 0.5]]]]))


def test_start_at_keeps_each_stage_at_its_target(model):
    torch.manual_seed(0)
    modules = DecisionModules.for_model(model).start_at([0.5, 0.3, 0.1])
    width = model.config.text_config.hidden_size
    visual, text = torch.randn(2, 6, width), torch.randn(2, 4, width)
    for stage, conditional in zip(modules.stages, [0.5, 0.6, 1 / 3]):
        keep = stage(visual, text, torch.ones(2, 4, dtype=torch.bool)).softmax(-1)[..., 0]
        torch.testing.assert_close(keep, torch.full_like(keep, conditional))


def test_decisions_are_cumulative_and_ratio_loss_is_eq_11():
    d1 = torch.tensor([[1.0, 1, 0, 0]])
    d2 = torch.tensor([[1.0, 0, 0, 0]])
    assert ratio_loss([d1, d2], [0.5, 0.5]).item() == pytest.approx(((0.5 - 0.5) ** 2 + (0.5 - 0.25) ** 2) / 2)


@torch.no_grad()
@pytest.mark.parametrize("rho,ratios", [(0.6, (0.6, 0.4, 0.2)), (0.5, (0.5, 0.3, 0.1)), (0.45, (0.45, 0.25, 0.05)),
                                        (0.3, (0.3, 0.18, 0.06))])  # the paper's rule while every stage keeps tokens
def test_realised_kept_counts_per_stage(model, modules_dir, rho, ratios):
    inputs = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7, 8))])
    with lofi.pruned(model, "lvpruning", keep=rho, path=modules_dir) as handle:
        model(**inputs)
    expected = [max(1, math.ceil(r * N_VISUAL - 1e-9)) for r in ratios]
    assert [k.shape for k in handle.kept] == [(2, n) for n in expected]
    assert handle.stages == [1, 2, 3]
    for earlier, later in zip(handle.kept, handle.kept[1:]):  # a dropped token never comes back
        assert all(set(later[b].tolist()) <= set(earlier[b].tolist()) for b in range(2))


def test_sampling_draws_in_proportion_to_the_weights():
    weights = np.array([4.0, 2.0, 1.0, 1.0])
    uniform = torch.rand(200_000, 4, generator=torch.Generator().manual_seed(0))
    log_w = torch.tensor(np.log(weights), dtype=torch.float32).expand(200_000, -1)
    first = sample_without_replacement(log_w, 1, uniform)[:, 0]
    np.testing.assert_allclose(np.bincount(first.numpy(), minlength=4) / 200_000, weights / weights.sum(),
                               atol=0.005)
    pairs = sample_without_replacement(log_w, 2, uniform)
    both = ((pairs == 0).any(1) & (pairs == 1).any(1)).float().mean().item()
    # P({0, 1}) = P(0 then 1) + P(1 then 0) = 4/8 * 2/4 + 2/8 * 4/6
    assert abs(both - (4 / 8 * 2 / 4 + 2 / 8 * 4 / 6)) < 0.005
    assert all(len(set(row.tolist())) == 2 for row in pairs[:1000])  # without replacement


def test_sampled_selection_keeps_the_counts_and_is_seeded_per_sample(model, modules_dir):
    prompts = [prompt_ids(3), prompt_ids(3, (5,), (7, 8))]
    inputs = make_inputs(prompts=prompts)

    def kept(batch, **options):
        with lofi.pruned(model, "lvpruning", keep=0.5, path=modules_dir, **options) as handle:
            model(**batch)
        return handle.kept

    sampled = kept(inputs, selection="sample")
    expected = [max(1, math.ceil(r * N_VISUAL - 1e-9)) for r in (0.5, 0.3, 0.1)]
    assert [k.shape for k in sampled] == [(2, n) for n in expected]
    for earlier, later in zip(sampled, sampled[1:]):
        assert all(set(later[b].tolist()) <= set(earlier[b].tolist()) for b in range(2))
    again = kept(inputs, selection="sample")
    assert all(torch.equal(a.sort(1).values, b.sort(1).values) for a, b in zip(sampled, again))
    row = int(inputs["attention_mask"].all(1).nonzero()[0])  # the longer prompt: no padding to strip alone
    alone = kept({k: v[row:row + 1] for k, v in inputs.items()}, selection="sample")
    assert all(set(a[row].tolist()) == set(b[0].tolist()) for a, b in zip(sampled, alone))
    other_seed = kept(inputs, selection="sample", seed=1)
    top = kept(inputs)
    assert any(set(a[0].tolist()) != set(b[0].tolist()) for a, b in zip(sampled, other_seed))
    assert any(set(a[0].tolist()) != set(b[0].tolist()) for a, b in zip(sampled, top))
    with pytest.raises(ValueError, match=r"valid: \['topk', 'sample'\]"):
        LVPruning(selection="top-k")


@torch.no_grad()
def test_keep_all_reproduces_the_baseline(model, modules_dir):
    inputs = make_inputs()
    base = model(**inputs).logits
    with lofi.pruned(model, "lvpruning", keep=1.0, offsets=(0, 0, 0), path=modules_dir):
        torch.testing.assert_close(model(**inputs).logits, base, atol=1e-5, rtol=0)


def test_save_and_load_round_trip(model, modules_dir):
    loaded = DecisionModules.load(modules_dir)
    torch.manual_seed(0)
    original = DecisionModules.for_model(model)
    assert loaded.settings == original.settings
    for (k, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_missing_modules_name_the_training_command(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m analysis.train_lvpruning"):
        with lofi.pruned(model, "lvpruning", keep=0.5, path=tmp_path):
            pass


@torch.no_grad()
def test_training_masks_equal_true_dropping_of_the_same_tokens(model, modules_dir):
    inputs = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7, 8))], seed=4)
    inputs["position_ids"] = positions(inputs["attention_mask"])
    with lofi.pruned(model, "lvpruning", keep=0.5, path=modules_dir) as handle:
        dropped = model(**inputs, use_cache=False).logits
    fixed = []
    for kept in handle.kept:  # cumulative 0/1 decisions over the image's visual tokens
        fixed.append(torch.zeros(2, N_VISUAL).scatter(1, kept, 1.0))
    with soft_pruning(model, DecisionModules.load(modules_dir), fixed=fixed):
        soft = model(**inputs, use_cache=False).logits
    is_visual = inputs["input_ids"] == 3
    keep = ~is_visual
    visual_pos = is_visual.nonzero()[:, 1].view(2, -1)
    keep.scatter_(1, visual_pos.gather(1, handle.kept[-1]), True)
    index = keep.nonzero()[:, 1].view(2, -1)
    soft = soft.gather(1, index[..., None].expand(-1, -1, soft.shape[-1]))
    valid = inputs["attention_mask"].bool().gather(1, index)
    torch.testing.assert_close(dropped[valid], soft[valid], atol=1e-5, rtol=0)


def test_topk_decisions_are_inferences_choice_with_a_straight_through_gradient():
    torch.manual_seed(0)
    odds = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    previous = torch.zeros(2, 10, dtype=torch.float64)
    previous[0, :6] = previous[1, 4:] = 1
    decision = topk_decisions(odds, 3, previous, tau=2.0)
    for b in range(2):
        present = previous[b].nonzero()[:, 0]
        top = present[odds[b, present].argsort(descending=True)[:3]]
        assert set(decision[b].detach().nonzero()[:, 0].tolist()) == set(top.tolist())
    weights = torch.randn(2, 10, dtype=torch.float64)
    (decision * weights).sum().backward()
    sig = torch.sigmoid(odds.detach() / 2)
    torch.testing.assert_close(odds.grad, weights * sig * (1 - sig) / 2)
    noisy = topk_decisions(odds.detach(), 3, previous, noise=1.0)  # explores, still 3 among the present
    assert noisy.sum(1).tolist() == [3, 3] and bool((noisy <= previous).all())


@torch.no_grad()
def test_topk_training_decisions_are_the_tokens_inference_keeps(model, modules_dir):
    inputs = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7, 8))], seed=4)
    inputs["position_ids"] = positions(inputs["attention_mask"])
    with lofi.pruned(model, "lvpruning", keep=0.5, path=modules_dir) as handle:
        model(**inputs, use_cache=False)
    with soft_pruning(model, DecisionModules.load(modules_dir), topk=[0.5, 0.3, 0.1]) as state:
        model(**inputs, use_cache=False)
    for kept, decision in zip(handle.kept, state.decisions):
        assert decision.shape == (2, N_VISUAL)
        assert [set(d.nonzero()[:, 0].tolist()) for d in decision] == [set(k.tolist()) for k in kept]


def test_decision_flops_are_counted():
    model = tiny_llava()
    method = LVPruning(keep=0.5, path=None)
    schedule = method.schedule(4, 16)
    assert schedule == [(1, 8), (2, 5), (3, 2)]
    present = [16, 8, 5]
    flops = method.decision_flops(model.config, 6, present)
    assert flops == sum(decision_flops(64, 6, n) for n in present) > 0
    with pytest.raises(TypeError, match="takes no option.*layer"):
        lofi.build("lvpruning", keep=0.5, layer=2)  # its stages' layers come from its trained modules


def test_model_labels_are_the_frozen_models_greedy_answers(model):
    from analysis.bundled.batches import IGNORE
    from analysis.bundled.train_lvpruning import model_labels
    eos = 2
    inputs = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7, 8, 9, 10))])
    labels = torch.full_like(inputs["input_ids"], IGNORE)
    labels[:, -2], labels[:, -1] = 11, eos  # a one-token answer, then the end token
    batch = {**inputs, "labels": labels}
    relabelled = model_labels(model, batch, eos)
    with torch.no_grad():
        greedy = model(**inputs).logits[:, -3].argmax(-1)
    assert torch.equal(relabelled["labels"][:, -2], greedy)
    assert torch.equal(relabelled["input_ids"][:, -2], greedy)  # teacher forcing sees the same answer
    assert (relabelled["labels"][:, -1] == eos).all()
    assert torch.equal(relabelled["labels"][:, :-2], labels[:, :-2])
    assert torch.equal(relabelled["input_ids"][:, :-2], inputs["input_ids"][:, :-2])
    assert torch.equal(batch["labels"], labels)  # the caller's batch is left alone


@torch.no_grad()
def test_training_decisions_read_the_prompt_only_when_told(model, modules_dir):
    """Training is teacher forced, so the answer is in the sequence; at inference the modules decide at
    prefill, before it exists. With ``readable`` = the prompt, the training logits cannot see it."""
    modules = DecisionModules.load(modules_dir)
    logits = []
    hook = modules.stages[0].register_forward_hook(lambda m, a, out: logits.append(out))
    prompt = prompt_ids(3, (5,), (7, 8, 9))
    runs = {}
    try:
        for answer in (11, 12):
            inputs = make_inputs(prompts=[prompt + [answer, 2]], seed=1)
            readable = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
            readable[:, :len(prompt)] = True
            for name, mask in (("prompt", readable), ("all", None)):
                logits.clear()
                with soft_pruning(model, modules, readable=mask):
                    model(**inputs, use_cache=False)
                runs[name, answer] = logits[0]
    finally:
        hook.remove()
    torch.testing.assert_close(runs["prompt", 11], runs["prompt", 12], atol=0, rtol=0)
    assert not torch.allclose(runs["all", 11], runs["all", 12])  # without it the answer leaks in


@pytest.mark.parametrize("decisions", ["gumbel", "topk"])
def test_training_command_writes_modules_that_lofi_finds(tmp_path, decisions):
    import json

    from analysis.benchmark import datasets
    from analysis.bundled.train import train as train_bundled
    from analysis.bundled.train_lvpruning import train
    from analysis.study.evaluate import answer, load_model

    tiny = {"text_layers": 4, "text_width": 32, "text_heads": 2, "text_kv_heads": 2, "vision_layers": 1,
            "vision_width": 32, "patch_size": 16}
    model_dir = tmp_path / "tiny-llava"
    train_bundled(model_dir, steps=1, batch_size=2, turns=1, lr=1e-3, seed=0, eval_every=0,
                  config_overrides=tiny, progress=False)
    summary = train(model_dir, None, steps=2, batch_size=2, lr=1e-3, rho=0.5, lambda_ratio=1.0, seed=0,
                    progress=False, decisions=decisions)
    folder = model_dir / "lvpruning"
    log = [json.loads(line) for line in (folder / "training_log.jsonl").open()]
    assert [r["step"] for r in log] == [1, 2] and summary["layers"] == [1, 2, 3]
    assert all({"causal", "ratio", "kept"} <= set(r) and len(r["kept"]) == 3 for r in log)
    if decisions == "topk":  # inference's exact counts, ceil([0.5, 0.3, 0.1] x 16) of 16, in training too
        assert all(r["kept"] == [0.5, 0.3125, 0.125] for r in log) and summary["decisions"] == "topk"
    assert (folder / "loss_curve.png").is_file() and not (tmp_path / "tiny-llava" / "lvpruning.partial").exists()
    model, processor = load_model(model_dir)
    samples = datasets.load_split("val", limit=2)
    with lofi.pruned(model, "lvpruning", keep=0.5) as handle:  # found beside the weights
        assert len(answer(model, processor, samples, progress=False)) == 2
    assert [k.shape[1] for k in handle.kept] == [8, 5, 2]  # ceil([0.5, 0.3, 0.1] x 16)


def test_training_rejects_unknown_labels_and_decisions(tmp_path):
    from analysis.bundled.train_lvpruning import train
    common = dict(out=None, steps=1, batch_size=1, lr=1e-3, rho=0.5, lambda_ratio=1.0, seed=0)
    with pytest.raises(ValueError, match=r"unknown labels 'gold'; valid: \['dataset', 'model'\]"):
        train(tmp_path, labels="gold", **common)
    with pytest.raises(ValueError, match=r"unknown decisions 'soft'; valid: \['gumbel', 'topk'\]"):
        train(tmp_path, decisions="soft", **common)


def test_one_block_modules_cost_what_their_one_block_computes():
    model = tiny_llava()
    width = model.config.text_config.hidden_size
    with pytest.raises(ValueError, match="at least one cross-attention block, got blocks=0"):
        DecisionModules.for_model(model, blocks=0)
    one = DecisionModules.for_model(model, blocks=1)
    assert one.settings["blocks"] == 1 and all(len(stage.blocks) == 1 for stage in one.stages)
    method = LVPruning(keep=0.5)
    paper = method.decision_flops(model.config, 7, [16, 8])  # no modules bound: the paper's 2 blocks
    method.modules = one
    assert method.decision_flops(model.config, 7, [16, 8]) == sum(decision_flops(width, 7, n, 1) for n in (16, 8))
    assert paper == sum(decision_flops(width, 7, n, 2) for n in (16, 8))
    head = 4 * 16 * width + 4 * 8 * width  # W_O, once per module whatever its blocks
    assert paper - head == pytest.approx(2 * (method.decision_flops(model.config, 7, [16, 8]) - head))

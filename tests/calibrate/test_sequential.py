"""Layer-by-layer calibration runner on a tiny llama, a tiny BERT and a stack-less MLP."""

from __future__ import annotations

import pytest
import torch

from leanml.calibrate.hessian import HessianAccumulator
from leanml.calibrate.sequential import (
    BlockContext,
    capture_block_inputs,
    find_block_stack,
    run_sequential,
    window_call,
)
from leanml.errors import LeanmlError
from tests.conftest import tiny_llama_module


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config, add_pooling_layer=False).eval()


def windows(n: int = 3, length: int = 12, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (length,), generator=g) for _ in range(n)]


def linears(model: torch.nn.Module, under: str) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(under)]


def test_find_block_stack() -> None:
    llama, bert = tiny_llama_module(), tiny_bert()
    assert find_block_stack(llama)[0] == "model.layers"
    assert find_block_stack(bert)[0] == "encoder.layer"
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert find_block_stack(mlp) is None


def test_captured_inputs_of_block0_are_embeddings() -> None:
    model = tiny_llama_module()
    ws = windows()
    calls = capture_block_inputs(model, model.model.layers[0], ws)
    assert len(calls) == len(ws)
    for (args, kwargs), w in zip(calls, ws, strict=True):
        assert torch.equal(args[0], model.model.embed_tokens(w[None]))
        assert "position_embeddings" in kwargs
        assert kwargs.get("past_key_values") is None


def test_bert_captured_inputs_are_embeddings() -> None:
    model = tiny_bert()
    ws = windows()
    calls = capture_block_inputs(model, model.encoder.layer[0], ws)
    for (args, _), w in zip(calls, ws, strict=True):
        assert torch.allclose(args[0], model.embeddings(input_ids=w[None]))


def test_stages_group_shared_inputs_in_call_order() -> None:
    seen: dict[str, list[list[str]]] = {}

    def record(ctx: BlockContext) -> None:
        rel = [[n[len(ctx.prefix) + 1 :] for n in s] for s in ctx.stages]
        seen[ctx.prefix] = rel

    llama = tiny_llama_module()
    run_sequential(llama, windows(1), linears(llama, "model.layers."), record)
    assert seen["model.layers.1"] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    bert = tiny_bert()
    seen.clear()
    run_sequential(bert, windows(1), linears(bert, "encoder.layer."), record)
    assert seen["encoder.layer.0"] == [
        ["attention.self.query", "attention.self.key", "attention.self.value"],
        ["attention.output.dense"],
        ["intermediate.dense"],
        ["output.dense"],
    ]


def reference_hessians(model: torch.nn.Module, names: list[str], ws: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """2/n XᵀX of every named linear's inputs, from hooks on the unmodified full model."""
    accs = {n: HessianAccumulator() for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda _m, a, n=n: accs[n].add(a[0])) for n in names]
    with torch.no_grad():
        for w in ws:
            args, kwargs = window_call(model, w)
            model(*args, **kwargs)
    for h in handles:
        h.remove()
    return {n: a.hessian for n, a in accs.items()}


@pytest.mark.parametrize("early_stop", [True, False])
def test_collect_matches_full_model_hooks_without_changes(early_stop: bool) -> None:
    model = tiny_llama_module()
    ws = windows()
    names = linears(model, "model.layers.")
    ref = reference_hessians(model, names, ws)
    got: dict[str, torch.Tensor] = {}

    def process(ctx: BlockContext) -> None:
        for stage in ctx.stages:
            accs = ctx.collect(stage, early_stop=early_stop)
            assert len({id(a) for a in accs.values()}) == 1  # one accumulator per shared input
            got.update({n: a.hessian for n, a in accs.items()})

    run_sequential(model, ws, names, process, hessian_dtype=torch.float64)
    assert set(got) == set(names)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6)


def test_changes_feed_forward_to_next_block() -> None:
    """Zeroing block 0's down_proj makes block 1 see embeddings + attention output only."""
    model = tiny_llama_module()
    ws = windows()
    names = linears(model, "model.layers.")
    got = {}

    def process(ctx: BlockContext) -> None:
        if ctx.index == 0:
            with torch.no_grad():
                ctx.linears["model.layers.0.mlp.down_proj"].weight.zero_()
        else:
            got.update(ctx.collect(["model.layers.1.self_attn.q_proj"]))

    run_sequential(model, ws, names, process, hessian_dtype=torch.float64)
    ref = reference_hessians(model, ["model.layers.1.self_attn.q_proj"], ws)  # the model now has the change
    torch.testing.assert_close(got["model.layers.1.self_attn.q_proj"].hessian, ref["model.layers.1.self_attn.q_proj"])


def test_fallback_without_stack(mlp) -> None:
    x = torch.randn(6, 20)
    calls = []

    def process(ctx: BlockContext) -> None:
        calls.append(ctx.index)
        assert ctx.stages == [["0"], ["2"]]
        accs = ctx.collect(["0", "2"])
        torch.testing.assert_close(accs["0"].hessian, 2.0 / 6 * x.T.double() @ x.double(), rtol=1e-5, atol=1e-5)
        h = torch.relu(mlp[0](x)).double()
        torch.testing.assert_close(accs["2"].hessian, 2.0 / 6 * h.T @ h, rtol=1e-5, atol=1e-5)

    run_sequential(mlp, [x], ["0", "2"], process, hessian_dtype=torch.float64)
    assert calls == [-1]


def test_targets_outside_the_stack_come_last() -> None:
    model = tiny_llama_module()
    order = []
    names = ["model.layers.0.mlp.up_proj", "lm_head", "model.layers.1.mlp.up_proj"]
    run_sequential(model, windows(1), names, lambda ctx: order.append((ctx.index, ctx.targets)))
    assert order == [(0, names[:1]), (1, names[2:]), (-1, ["lm_head"])]


def test_bad_input() -> None:
    model = tiny_llama_module()
    with pytest.raises(LeanmlError, match="nope"):
        run_sequential(model, windows(1), ["nope"], lambda ctx: None)
    with pytest.raises(LeanmlError, match="not an nn.Linear"):
        run_sequential(model, windows(1), ["model.norm"], lambda ctx: None)
    with pytest.raises(LeanmlError, match="no calibration windows"):
        run_sequential(model, [], ["lm_head"], lambda ctx: None)
    with pytest.raises(LeanmlError, match="window of type"):
        run_sequential(model, ["text"], ["lm_head"], lambda ctx: None)


def test_dense_cross_statistics_match_a_separate_dense_run() -> None:
    """With dense_inputs, collect_dense_cross pairs each linear's inputs in the model being changed with
    the inputs the same linear gets in an untouched copy (checked against hooks on that copy)."""
    import copy

    model = tiny_llama_module()
    reference = copy.deepcopy(model)
    ws = windows(n=2)
    name = "model.layers.1.mlp.down_proj"
    dense_seen, now_seen = [], []
    ref_lin = dict(reference.named_modules())[name]
    h = ref_lin.register_forward_pre_hook(lambda _m, a: dense_seen.append(a[0].reshape(-1, a[0].shape[-1])))
    for w in ws:
        reference(input_ids=w[None], use_cache=False)
    h.remove()
    got = {}

    def process(ctx: BlockContext) -> None:
        for lin in ctx.linears.values():  # perturb every block: later inputs differ from the dense ones
            lin.weight.data.mul_(0.5)
        if ctx.prefix == "model.layers.1":
            lin = ctx.linears[name]
            hook = lin.register_forward_pre_hook(lambda _m, a: now_seen.append(a[0].reshape(-1, a[0].shape[-1])))
            for args, kwargs in ctx.calls:
                ctx.module(*args, **kwargs)
            hook.remove()
            got["xtx"], got["xtd"] = ctx.collect_dense_cross(name)

    run_sequential(model, ws, linears(model, "model.layers"), process, dense_inputs=True)
    X = torch.cat(now_seen).double()
    D = torch.cat(dense_seen).double()
    assert not torch.allclose(X, D)
    torch.testing.assert_close(got["xtx"], X.T @ X, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["xtd"], X.T @ D, rtol=1e-6, atol=1e-6)


def test_dense_cross_needs_dense_inputs() -> None:
    model = tiny_llama_module()

    def process(ctx: BlockContext) -> None:
        with pytest.raises(LeanmlError, match="dense_inputs=True"):
            ctx.collect_dense_cross(ctx.targets[0])

    run_sequential(model, windows(n=1), linears(model, "model.layers.0"), process)


@pytest.mark.parametrize("dense", [False, True])
def test_activations_on_disk_give_the_same_statistics(tmp_path, dense: bool) -> None:
    """The cached inputs kept on disk (one file per window) give the in-memory run's statistics exactly,
    with changes fed forward (and the dense copy's inputs, for SparseGPT's dense targets); the files are
    removed when the run ends."""
    import copy

    from leanml.calibrate.sequential import DiskCalls, activations_on_disk

    base = tiny_llama_module()
    ws = windows(n=3)

    def run(model) -> dict:
        got, seen = {}, []

        def process(ctx: BlockContext) -> None:
            seen.append(type(ctx.calls).__name__)
            for stage in ctx.stages:
                for n, acc in ctx.collect(stage).items():
                    got[n] = acc.hessian.clone()
            if dense:
                n = ctx.targets[-1]
                got[n + "/xtd"] = ctx.collect_dense_cross(n)[1]
                if isinstance(ctx.calls, DiskCalls):
                    assert len(list(ctx.calls.folder.parent.iterdir())) == 2  # calls and dense calls
            for lin in ctx.linears.values():
                lin.weight.data.mul_(0.5)

        run_sequential(model, ws, linears(model, "model.layers"), process, hessian_dtype=torch.float64, dense_inputs=dense)
        return got, seen

    ref, kinds = run(copy.deepcopy(base))
    with activations_on_disk(tmp_path):
        got, disk_kinds = run(copy.deepcopy(base))
    assert set(kinds) == {"list"} and set(disk_kinds) == {"DiskCalls"}
    assert sorted(got) == sorted(ref) and len(ref) >= 7
    for n in ref:
        assert torch.equal(got[n], ref[n]), n
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "qwen3"])
def test_every_block_is_calibrated_on_the_inputs_of_a_real_forward(family):
    """Gemma 2/3 give sliding and global layers different masks and rotary tables: each block gets what
    the model's own forward gives it (reference: pre-hooks on every block in a plain forward)."""
    import transformers as tf

    from leanml.calibrate.sequential import find_block_stack, run_sequential
    from tests.families import config_for

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config_for(family)).eval()
    _, blocks = find_block_stack(model)
    windows = [torch.randint(0, 90, (20,), generator=torch.Generator().manual_seed(k)) for k in range(2)]
    seen: dict[int, list] = {i: [] for i in range(len(blocks))}
    hooks = [
        b.register_forward_pre_hook(lambda _m, a, kw, i=i: seen[i].append((a, kw)), with_kwargs=True)
        for i, b in enumerate(blocks)
    ]
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    for h in hooks:
        h.remove()
    got: dict[int, list] = {}
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    run_sequential(model, windows, targets, lambda ctx: got.__setitem__(ctx.index, list(ctx.calls)))
    assert sorted(got) == list(range(len(blocks)))

    def tensors(x):
        if isinstance(x, torch.Tensor):
            return [x]
        if isinstance(x, (tuple, list)):
            return [t for v in x for t in tensors(v)]
        return []

    for i in range(len(blocks)):
        for k in range(len(windows)):
            (ra, rkw), (ga, gkw) = seen[i][k], got[i][k]
            ref_hidden = ra[0] if ra else rkw["hidden_states"]
            hidden = ga[0] if ga else gkw["hidden_states"]
            torch.testing.assert_close(hidden, ref_hidden, rtol=1e-6, atol=1e-6)
            for key in ("position_embeddings", "attention_mask"):
                if key in rkw:
                    ref_t, got_t = tensors(rkw[key]), tensors(gkw.get(key))
                    assert len(ref_t) == len(got_t), (i, key)
                    assert all(torch.equal(a, b) for a, b in zip(ref_t, got_t, strict=True)), (i, key)

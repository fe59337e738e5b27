"""Layer-by-layer compression (models larger than memory) and calibration split over torchrun ranks.

References: the in-memory path on the same folder (the tensors written must be the same, exactly for one
process; within float summation order across processes), and transformers' own loader for the lazily
opened model."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from leanml.artifact import load_artifact
from leanml.errors import LeanmlError
from leanml.models.lazy import LAZY_KEY, materialize, on_meta, open_lazy, release
from leanml.models.loaders import load_hf_folder
from leanml.pipeline import compress, layer_by_layer_plan
from tests.distill.test_trainer import PROBE, _torchrun

ROOT = Path(__file__).resolve().parents[2]

GPTQ = {"name": "g", "steps": [{"kind": "weight-only", "bits": 4, "group_size": 16, "calib_windows": 4, "window": 64}]}
AWQ = {"name": "a", "steps": [{**GPTQ["steps"][0], "method": "awq"}]}
RTN = {"name": "r", "steps": [{"kind": "weight-only", "bits": 4, "group_size": 16, "method": "rtn", "head_bits": 8}]}
WANDA = {"name": "w", "steps": [{"kind": "prune", "method": "wanda", "sparsity": 0.5, "calib_windows": 4, "window": 64}]}
SPARSEGPT = {"name": "s", "steps": [{**WANDA["steps"][0], "method": "sparsegpt", "pattern": "2:4", "sparsity": None}]}
MAGNITUDE = {"name": "m", "steps": [{"kind": "prune", "method": "magnitude", "sparsity": 0.4, "scope": "row"}]}
DENSE = {"name": "d", "steps": [{**WANDA["steps"][0], "method": "sparsegpt", "dense_targets": True}]}
INT8_DYNAMIC = {"name": "i8d", "steps": [{"kind": "int8-dynamic"}]}
INT8_STATIC = {"name": "i8s", "steps": [{"kind": "int8-static", "observer": "percentile", "calib_batches": 4}]}
SMOOTH = {"name": "sq", "steps": [{"kind": "smoothquant", "calib_windows": 4}]}
FFN_L2 = {"name": "f", "steps": [{"kind": "prune-structured", "unit": "neurons", "ratio": 0.25}]}
FFN_ACT = {"name": "fa", "steps": [{**FFN_L2["steps"][0], "criterion": "activation", "calib_windows": 4, "window": 64}]}
HEADS = {"name": "h", "steps": [{"kind": "prune-structured", "unit": "heads", "ratio": 0.5, "criterion": "l1"}]}
QUERIES = {
    "name": "q",
    "steps": [{**HEADS["steps"][0], "gqa": "queries", "criterion": "activation", "calib_windows": 4, "window": 64}],
}
SMOOTH_STATIC = {"name": "sqs", "steps": [{"kind": "smoothquant", "activations": "static", "calib_windows": 4}]}


def _save(folder: Path, model, family: str = "bpe") -> Path:
    from tests.conftest import _tiny_tokenizer

    model.save_pretrained(folder)
    _tiny_tokenizer(family).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """Three blocks, untied head, stored in bf16 (as large checkpoints are): the lazy reader converts."""
    from tests.conftest import _tiny_tokenizer, tiny_llama_module

    tok = _tiny_tokenizer("bpe")
    model = tiny_llama_module(layers=3, vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=False)
    return _save(tmp_path_factory.mktemp("models") / "llama3", model.to(torch.bfloat16))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
def test_lazy_open_reads_the_same_weights_as_the_whole_load(tmp_path, family):
    import transformers as tf

    from tests.families import config_for

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config_for(family)).eval()  # gpt2: Conv1D as stored; gemma: tied
    folder = _save(tmp_path / family, model)
    whole = load_hf_folder(folder, task="causal-lm")
    lazy = open_lazy(folder, task="causal-lm")
    assert on_meta(lazy.module)
    materialize(lazy.module, "", lazy.meta[LAZY_KEY])
    assert not on_meta(lazy.module)
    x = torch.randint(0, 90, (1, 12))
    with torch.no_grad():
        assert torch.equal(whole.module(input_ids=x).logits, lazy.module(input_ids=x).logits)
    if family == "gemma":
        assert lazy.module.lm_head.weight is lazy.module.model.embed_tokens.weight
    from leanml.calibrate.sequential import find_block_stack

    _, blocks = find_block_stack(lazy.module)
    release(blocks[0])
    assert on_meta(blocks[0]) and not on_meta(blocks[1])


@pytest.mark.parametrize(
    "recipe",
    [GPTQ, AWQ, RTN, WANDA, SPARSEGPT, MAGNITUDE, DENSE, INT8_DYNAMIC, INT8_STATIC, SMOOTH, SMOOTH_STATIC]
    + [FFN_L2, FFN_ACT, HEADS, QUERIES],
    ids=[
        "gptq",
        "awq",
        "rtn+head8",
        "wanda",
        "sparsegpt-2:4",
        "magnitude",
        "sparsegpt-dense-targets",
        "int8-dynamic",
        "int8-static",
        "smoothquant",
        "smoothquant-static",
        "ffn-neurons-l2",
        "ffn-neurons-activation",
        "kv-groups-l1",
        "query-heads-activation",
    ],
)
def test_layer_by_layer_writes_the_in_memory_result(tmp_path, llama3_dir, text_file, recipe):
    whole = compress(llama3_dir, recipe, data=text_file, out=tmp_path / "whole", measure=False, lazy=False)
    lazy = compress(llama3_dir, recipe, data=text_file, out=tmp_path / "lazy", measure=False, lazy=True)
    assert whole.out is not None and lazy.out is not None
    meta = json.loads((tmp_path / "lazy" / "leanml.json").read_text())
    assert len(meta["weights"]) == 4  # one file per block, one for the rest
    assert meta["layers"] == json.loads((tmp_path / "whole" / "leanml.json").read_text())["layers"]
    a, b = load_artifact(tmp_path / "whole"), load_artifact(tmp_path / "lazy")
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sorted(sa) == sorted(sb)
    # static SmoothQuant observes x / s where the whole model observes its smoothed float layers' inputs:
    # the same ranges up to float rounding (a zero point may round the other way); the rest is exact
    rounded = recipe is SMOOTH_STATIC
    for key in sa:
        if rounded and key.endswith("act_scale"):
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=0, msg=key)
        elif rounded and key.endswith("act_zero_point"):
            assert abs(float(sa[key]) - float(sb[key])) <= 1, key
        else:
            assert torch.equal(sa[key], sb[key]), key
    x = torch.randint(0, 200, (1, 20))
    with torch.no_grad():
        la, lb = a.module(input_ids=x).logits, b.module(input_ids=x).logits
    if rounded:
        assert float((la - lb).norm() / la.norm()) < 1e-2
    else:
        assert torch.equal(la, lb)
    facts = json.loads((tmp_path / "lazy" / "layer_by_layer.json").read_text())
    assert facts["blocks"] == 3 and facts["peak_rss_bytes"] > 0
    if recipe["steps"][0]["kind"] == "prune-structured":  # the same widths, cuts and report
        report = json.loads((tmp_path / "lazy" / "prune.json").read_text())
        assert report == json.loads((tmp_path / "whole" / "prune.json").read_text())
        assert report["params_removed"] > 0
        assert json.loads((tmp_path / "lazy" / "config.json").read_text()) == json.loads(
            (tmp_path / "whole" / "config.json").read_text()
        )
    if recipe["steps"][0]["kind"] == "prune":  # the same sparse layers and the same report
        assert {v["type"] for v in meta["layers"].values()} == {"SparseLinear"}
        report = json.loads((tmp_path / "lazy" / "prune.json").read_text())
        assert report == json.loads((tmp_path / "whole" / "prune.json").read_text())
        assert 0.3 < report["overall_sparsity"] < 0.6


def test_layer_by_layer_measures_the_saved_model(tmp_path, llama3_dir, text_file):
    result = compress(llama3_dir, RTN, data=text_file, out=tmp_path / "o", lazy=True, repeats=1)
    assert result.before is None and result.after is not None
    assert result.after.quality["metric"] == "perplexity" and result.after.quality["value"] > 1
    assert any("layer by layer" in n for n in result.notes)
    assert (tmp_path / "o" / "after.json").is_file()
    # the original's perplexity, one block at a time, is the whole model's on the same windows
    before = json.loads((tmp_path / "o" / "before_quality.json").read_text())
    whole = compress(llama3_dir, RTN, data=text_file, out=tmp_path / "w", lazy=False, repeats=1)
    assert before["n_tokens"] == whole.before.quality["n_tokens"]
    assert before["value"] == pytest.approx(whole.before.quality["value"], rel=1e-5)
    assert any("the original's perplexity, computed layer by layer" in n for n in result.notes)


def test_the_size_decides_and_refusals_are_one_line(tmp_path, llama3_dir, text_file):
    assert layer_by_layer_plan(llama3_dir, GPTQ) is None  # small: loaded whole
    plan = layer_by_layer_plan(llama3_dir, GPTQ, max_memory="1KB")
    assert plan is not None and plan[0] == llama3_dir and plan[1] > 1000
    two_steps = {"name": "t", "steps": [RTN["steps"][0], {"kind": "prune", "sparsity": 0.5}]}
    with pytest.raises(LeanmlError, match="too much for .* memory, and layer-by-layer compression runs one weight-only"):
        layer_by_layer_plan(llama3_dir, two_steps, max_memory="1KB")
    with pytest.raises(LeanmlError, match="one weight-only step"):
        compress(llama3_dir, two_steps, data=text_file, out=tmp_path / "x", lazy=True)
    with pytest.raises(LeanmlError, match="pass --out"):
        compress(llama3_dir, GPTQ, data=text_file, lazy=True)
    with pytest.raises(LeanmlError, match="reads a Hugging Face folder"):
        compress(text_file, GPTQ, data=text_file, out=tmp_path / "y", lazy=True)
    for step, why in [
        ({"method": "taylor"}, "needs gradients"),
        ({"scope": "global"}, "scope 'global'"),
        ({"allocation": "owl", "scope": "layer"}, "allocation 'owl'"),
    ]:
        bad = {"name": "p", "steps": [{**WANDA["steps"][0], **step}]}
        with pytest.raises(LeanmlError, match=why):
            compress(llama3_dir, bad, data=text_file, out=tmp_path / "p", lazy=True)
    for step, why in [({"unit": "layers"}, "unit 'layers' ranks the whole model"), ({"criterion": "taylor"}, "'taylor'")]:
        bad = {"name": "p", "steps": [{**FFN_L2["steps"][0], **step}]}
        with pytest.raises(LeanmlError, match=why):
            compress(llama3_dir, bad, data=text_file, out=tmp_path / "p", lazy=True)
    upgrade = {"name": "u", "steps": [{**GPTQ["steps"][0], "upgrade": ["re:.*down_proj"]}]}
    with pytest.raises(LeanmlError, match="'upgrade'"):
        compress(llama3_dir, upgrade, data=text_file, out=tmp_path / "z", lazy=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists() and not (tmp_path / "p").exists()


def test_sharded_artifact_with_a_missing_file_is_refused(tmp_path, llama3_dir, text_file):
    compress(llama3_dir, RTN, out=tmp_path / "o", measure=False, lazy=True)
    (tmp_path / "o" / "model-00002.safetensors").unlink()
    with pytest.raises(LeanmlError, match="missing model-00002.safetensors"):
        load_artifact(tmp_path / "o")


def test_uncached_dequantization_gives_the_same_output(tmp_path, llama3_dir):
    from leanml.quantize.modules import QuantLinear

    compress(llama3_dir, RTN, out=tmp_path / "o", measure=False, lazy=True)
    handle = load_artifact(tmp_path / "o")
    x = torch.randint(0, 200, (1, 20))
    with torch.no_grad():
        cached = handle.module(input_ids=x).logits
        for m in handle.module.modules():
            if isinstance(m, QuantLinear):
                m.cache_weight, m._weight = False, None
        plain = handle.module(input_ids=x).logits
    assert torch.equal(cached, plain)
    assert all(m._weight is None for m in handle.module.modules() if isinstance(m, QuantLinear))


JOB = textwrap.dedent("""
    import json, os, sys, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    from leanml.artifact import load_artifact
    from leanml.pipeline import compress
    folder, text, out, tag = sys.argv[1:5]
    recipe = json.loads({recipe!r})
    for lazy in (False, True):
        target = os.path.join(out, f"{{tag}}-{{'lazy' if lazy else 'whole'}}")
        compress(folder, recipe, data=text, out=target, measure=False, lazy=lazy)
    if int(os.environ.get("RANK", "0")) == 0:
        for lazy in (False, True):
            target = os.path.join(out, f"{{tag}}-{{'lazy' if lazy else 'whole'}}")
            state = load_artifact(target).module.state_dict()
            json.dump({{k: v.float().flatten().tolist() for k, v in state.items()}}, open(target + ".json", "w"))
""")


@pytest.mark.process
@pytest.mark.parametrize("step", [GPTQ["steps"][0], FFN_ACT["steps"][0]], ids=["gptq", "ffn-neurons-activation"])
def test_two_process_calibration_gives_the_single_process_weights(tmp_path, processes, llama3_dir, text_file, step):
    recipe = {"name": "g", "steps": [{**step, "calib_windows": 6}]}  # 3 windows per rank
    script = tmp_path / "job.py"
    script.write_text(JOB.format(root=str(ROOT), recipe=json.dumps(recipe)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LEANML_QUIET": "1"}
    env.pop("WORLD_SIZE", None)
    args = [str(llama3_dir), str(text_file), str(tmp_path)]
    one = processes.run([sys.executable, str(script), *args, "one"], env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    ok = _torchrun(processes, probe, env)
    if ok.returncode != 0:  # the machine itself cannot host a 2-process gloo job (sandboxed network)
        pytest.skip(f"a bare 2-process gloo all-reduce fails on this machine: {(ok.stderr.strip().splitlines() or ['?'])[-1]}")
    job = _torchrun(processes, script, env, *args, "two")
    assert job.returncode == 0, f"torchrun failed ({job.returncode}):\n{job.stdout[-3000:]}\n{job.stderr[-6000:]}"
    assert not (tmp_path / "two-whole-rank1").exists()
    for kind in ("whole", "lazy"):
        a = json.loads((tmp_path / f"one-{kind}.json").read_text())
        b = json.loads((tmp_path / f"two-{kind}.json").read_text())
        assert sorted(a) == sorted(b)
        moved = 0
        for key in a:
            x, y = torch.tensor(a[key]), torch.tensor(b[key])
            if key.endswith("qweight") or key.endswith("zero_points"):
                moved += int((x != y).sum())  # a code may flip where a value sits on a rounding boundary
            else:
                assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), key
        total = sum(len(v) for k, v in a.items() if k.endswith("qweight"))
        assert moved <= 0.001 * total, f"{moved} of {total} packed bytes differ ({kind})"


@pytest.mark.parametrize("recipe", [GPTQ, RTN], ids=["gptq", "rtn"])
def test_a_finished_block_holds_no_float_weights(tmp_path, llama3_dir, text_file, recipe, monkeypatch):
    """Memory stays at one block: when a block is released, every float layer it started with that is
    still alive (GPTQ's calibration tables reference them) holds no real weights, and the output head
    is read only after the blocks."""
    import weakref

    import leanml.calibrate.streaming as streaming
    from leanml.calibrate.sequential import find_block_stack
    from leanml.data import load_data
    from leanml.recipe import load_recipe

    handle = open_lazy(llama3_dir)
    _, blocks = find_block_stack(handle.module)
    originals = [[weakref.ref(m) for m in b.modules() if isinstance(m, torch.nn.Linear)] for b in blocks]
    head = handle.module.lm_head
    checked = []

    def checked_release(module):
        i = next(i for i, b in enumerate(blocks) if b is module)
        alive = [r() for r in originals[i] if r() is not None]
        assert all(m.weight.device.type == "meta" for m in alive)
        checked.append((len(alive), head.weight.device.type))
        release(module)

    monkeypatch.setattr(streaming, "release", checked_release)
    streaming.compress_layer_by_layer(handle, load_recipe(recipe), load_data(text_file), tmp_path)
    assert len(checked) == len(blocks) and {h for _, h in checked} == {"meta"}
    if recipe is GPTQ:
        assert all(n > 0 for n, _ in checked)  # the tables did hold them: the check above had work to do
    assert head.weight.device.type != "meta"


@pytest.mark.parametrize("n,size", [(10, 3), (2, 2), (7, 1), (5, 4)])
def test_even_split_covers_every_row_once(n, size, monkeypatch):
    """Each rank's contiguous run of rows; runs differ by at most one and cover 0..n in order."""
    import leanml.distributed as d

    monkeypatch.setattr(d, "world", lambda: (0, size))
    bounds = d.even_split(n)
    assert len(bounds) == size and bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    lengths = [b - a for a, b in bounds]
    assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


def test_max_memory_caps_a_layer_by_layer_run(tmp_path, llama3_dir, text_file):
    from leanml.memory import rss_bytes

    limit = rss_bytes() // 2  # this process is already past it: the check after the first block stops the run
    with pytest.raises(LeanmlError, match=r"resident memory reached .* GiB by block 0 of 3, over --max-memory"):
        compress(llama3_dir, RTN, out=tmp_path / "o", measure=False, lazy=True, max_memory=limit)
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())  # nothing published, no temporary left
    compress(llama3_dir, RTN, out=tmp_path / "o", measure=False, lazy=True, max_memory="64GB")
    facts = json.loads((tmp_path / "o" / "layer_by_layer.json").read_text())
    assert facts["max_memory_bytes"] == 64 * 10**9 and 0 < facts["peak_rss_bytes"] < facts["max_memory_bytes"]


def test_memory_cap_sees_a_freed_spike():
    """The kernel's record of the peak (VmHWM) holds a spike freed before the check; reference: the size of
    the allocation itself."""
    from leanml.memory import MemoryCap, rss_bytes

    size = 256 * 2**20
    with MemoryCap() as cap:
        if not cap.kernel:
            pytest.skip("no VmHWM/clear_refs on this system")
        before = rss_bytes()
        spike = torch.ones(size // 4, dtype=torch.float32)  # touched pages: resident
        del spike
        assert rss_bytes() < before + size // 2  # freed: gone from the current resident size
        assert cap.peak() >= before + size * 0.95
        cap.limit = before + size // 2  # under the spike, over what is resident now: still past it
        with pytest.raises(LeanmlError, match="by the test, over --max-memory"):
            cap.check("the test")


@pytest.mark.parametrize("recipe", [GPTQ, DENSE], ids=["gptq", "sparsegpt-dense-targets"])
def test_activations_on_disk_write_the_in_memory_result(tmp_path, llama3_dir, text_file, monkeypatch, recipe):
    import leanml.calibrate.streaming as streaming

    whole = tmp_path / "out" / "whole"
    compress(llama3_dir, recipe, data=text_file, out=whole, measure=False, lazy=False)
    monkeypatch.setattr(streaming, "OFFLOAD_FRACTION", 0.0)  # any cached input goes to disk
    compress(llama3_dir, recipe, data=text_file, out=tmp_path / "out" / "lazy", measure=False, lazy=True)
    facts = json.loads((tmp_path / "out" / "lazy" / "layer_by_layer.json").read_text())
    assert facts["activations_on_disk"] == str(tmp_path / "out") and facts["activations_bytes"] > 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lazy", "whole"]  # its folder is gone
    sa, sb = load_artifact(whole).module.state_dict(), load_artifact(tmp_path / "out" / "lazy").module.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_int8_calibration_refuses_torchrun_and_layers_outside_the_stack(tmp_path, llama3_dir, text_file, monkeypatch):
    """Observed ranges cannot be summed over ranks: one line under torchrun, nothing written; a
    calibrated int8 step cannot reach the output head layer by layer, while int8-dynamic (data-free) can."""
    import leanml.distributed

    head = {"targets": ["re:.*(proj|lm_head)$"], "ignore": []}
    with pytest.raises(LeanmlError, match="layer 'lm_head' is outside the stack .* \\(smoothquant\\)"):
        compress(
            llama3_dir, {"name": "h", "steps": [{**SMOOTH["steps"][0], **head}]}, data=text_file, out=tmp_path / "h", lazy=True
        )
    dyn = compress(
        llama3_dir, {"name": "d", "steps": [{"kind": "int8-dynamic", **head}]}, out=tmp_path / "d", measure=False, lazy=True
    )
    assert json.loads((dyn.out / "leanml.json").read_text())["layers"]["lm_head"]["type"] == "Int8ActLinear"
    monkeypatch.setattr(leanml.distributed, "world", lambda: (0, 2))
    for recipe in (INT8_STATIC, SMOOTH):
        with pytest.raises(LeanmlError, match="in one process; run it without torchrun"):
            compress(llama3_dir, recipe, data=text_file, out=tmp_path / "t", lazy=True)
    assert not (tmp_path / "t").exists() and not (tmp_path / "h").exists()

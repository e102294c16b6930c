"""The method registry and configs, and the baseline methods (random, layerwise, prune): same unit budget as
sharing, deterministic, exact savings."""

from __future__ import annotations

import pytest
import torch
from archs import TINY, tiny_model

import headshare
from headshare.arch import blocks, layout_of
from headshare.methods import METHODS, make_config, parse_option, register_method
from headshare.methods.baselines import layer_similarity, output_energy
from headshare.plan import units_for_ratio
from headshare.units import unit_slices

BASELINES = ("random", "layerwise", "prune")


def _plan(model, ratio, method, tok, calib, **kw):
    """A plan with the tiny calibration text for the methods that read one (the others refuse the option)."""
    if "calib" in METHODS[method].config.options():
        kw = {"calib": calib, "calib_tokens": 128, **kw}
    return headshare.make_plan(model, ratio, method, tokenizer=tok, **kw)


def _bias_flags(model) -> dict[str, bool]:
    bl = blocks(model)[0]
    return {p.path: bl.get_submodule(p.path).bias is not None for p in layout_of(model.config).projections()}


def test_registered_for_the_cli():
    from headshare.cli import build_parser

    assert set(BASELINES) <= set(METHODS)
    args = build_parser().parse_args(["plan", "m", "--method", "layerwise", "--ratio", "0.3", "--out", "p.json"])
    assert args.method == "layerwise"


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.6])
def test_unit_count_determinism_and_validity(method, ratio, tiny_llama, tiny_tokenizer, calib_file):
    # 5 layers x 2 units: 0.25 -> 2 units, 0.5 -> 5 (not a multiple of 2: layerwise ends with a partial layer)
    model = tiny_llama(num_hidden_layers=5)
    layout = layout_of(model.config)
    plan = _plan(model, ratio, method, tiny_tokenizer, calib_file)
    assert plan.units_removed == units_for_ratio(ratio, layout)
    assert plan.method == method
    plan.validate(layout)
    again = _plan(model, ratio, method, tiny_tokenizer, calib_file)
    assert again.to_dict() == plan.to_dict()
    if method == "prune":
        assert plan.assignments == [] and len(set(plan.pruned)) == len(plan.pruned)
    else:
        assert plan.pruned == [] and all(a.source_layer < a.layer for a in plan.assignments)


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("arch", ["llama-gqa", "llama-mqa", "qwen2-bias", "gpt2"])
def test_parameters_removed_are_exactly_predicted(method, arch, tiny_tokenizer, calib_file):
    model = tiny_model(arch)
    layout = layout_of(model.config)
    plan = _plan(model, 0.5, method, tiny_tokenizer, calib_file)
    per_unit = layout.unit_params(_bias_flags(model))
    p0, b0 = headshare.unique_parameters(model)
    headshare.share(model, plan)
    p1, b1 = headshare.unique_parameters(model)
    assert plan.units_removed == units_for_ratio(0.5, layout) > 0
    assert p0 - p1 == plan.units_removed * per_unit
    assert b0 - b1 == plan.units_removed * per_unit * 4


def test_random_depends_on_the_seed(tiny_llama):
    model = tiny_llama(num_hidden_layers=6)
    plans = [headshare.make_plan(model, 0.5, "random", seed=s).to_dict()["assignments"] for s in range(4)]
    assert len({str(p) for p in plans}) == 4
    assert headshare.make_plan(model, 0.5, "random", seed=2).to_dict()["assignments"] == plans[2]
    assert headshare.make_plan(model, headshare.RandomConfig(ratio=0.5, seed=2)).to_dict()["assignments"] == plans[2]
    # random sources: not always the previous layer's same unit
    pairs = {(a["layer"] - a["source_layer"], a["unit"] - a["source_unit"]) for p in plans for a in p}
    assert len(pairs) > 2


def test_layerwise_takes_whole_layers_from_the_most_similar_layer(tiny_llama):
    model = tiny_llama(num_hidden_layers=4)
    layout = layout_of(model.config)
    bl = blocks(model)
    with torch.no_grad():  # layer 3 becomes a noisy copy of layer 1: the best layer pair by far
        for path in ("self_attn.q_proj", "self_attn.k_proj"):
            w = bl[1].get_submodule(path).weight
            bl[3].get_submodule(path).weight.copy_(w + 0.001 * torch.randn_like(w))
    U = layout.units_per_layer
    plan = headshare.make_plan(model, U / layout.units_total, "layerwise")
    assert [(a.layer, a.unit, a.source_layer, a.source_unit) for a in plan.assignments] == \
        [(3, u, 1, u) for u in range(U)]
    assert plan.notes["partial_layer"] is None
    assert plan.notes["layer_scores"]["3"][0] == 1 and plan.notes["layer_scores"]["3"][1] > 0.99

    # one unit more than a whole layer: the next layer is taken partially, by its best aligned unit
    more = headshare.make_plan(model, (U + 1) / layout.units_total, "layerwise")
    assert more.units_removed == U + 1
    partial = more.notes["partial_layer"]
    assert partial is not None and partial != 3
    assert sum(a.layer == partial for a in more.assignments) == 1


def test_layer_similarity_is_the_mean_aligned_unit_cosine():
    L, U = 3, 2
    sim = torch.randn(L * U, L * U)
    got = layer_similarity(sim, L, U)
    for a in range(L):
        for b in range(L):
            want = sum(sim[a * U + u, b * U + u] for u in range(U)) / U
            assert got[a, b] == pytest.approx(float(want), abs=1e-6)


@pytest.mark.parametrize("relative", [True, False])
def test_output_energy_matches_direct_computation(relative, tiny_llama, tiny_tokenizer, calib_file):
    model = tiny_llama(num_hidden_layers=3)
    layout = layout_of(model.config)
    energy = output_energy(model, tiny_tokenizer, calib_file, calib_tokens=64, block_size=32, relative=relative)
    # independently: capture each block's input and o_proj input, project each unit's slice through its columns
    o_in, h_in = {}, {}
    hooks = [b.self_attn.o_proj.register_forward_pre_hook(lambda _m, a, i=i: o_in.setdefault(i, []).append(a[0]))
             for i, b in enumerate(blocks(model))]
    hooks += [b.register_forward_pre_hook(lambda _m, a, k, i=i: h_in.setdefault(i, []).append(
        a[0] if a else k["hidden_states"]), with_kwargs=True) for i, b in enumerate(blocks(model))]
    from headshare.data import tokenize

    ids = tokenize(tiny_tokenizer, open(calib_file).read(), bos=False)[:64].view(2, 32)
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None])
    for h in hooks:
        h.remove()
    d = layout.head_dim * layout.q_heads_per_unit
    for layer, block in enumerate(blocks(model)):
        x = torch.cat(o_in[layer], dim=1)[0]  # (tokens, heads*d)
        stream = torch.cat(h_in[layer], dim=1)[0].pow(2).sum(-1) if relative else torch.ones(len(x))
        w = block.self_attn.o_proj.weight
        for u in range(layout.units_per_layer):
            y = x[:, u * d:(u + 1) * d] @ w[:, u * d:(u + 1) * d].T
            want = ((y ** 2).sum(-1) / stream).mean().item()
            assert energy[layer, u].item() == pytest.approx(want, rel=1e-4)


def test_prune_removes_the_silent_unit_first(tiny_llama, tiny_tokenizer, calib_file):
    model = tiny_llama(num_hidden_layers=3)
    layout = layout_of(model.config)
    o = layout.projections()[-1]
    with torch.no_grad():  # unit 1 of layer 0 writes nothing to the residual stream
        blocks(model)[0].self_attn.o_proj.weight[:, o.unit_index(1)] = 0.0
    assert unit_slices(blocks(model)[0].self_attn.o_proj.weight, o, layout.units_per_layer)["o"][1].abs().sum() == 0
    plan = _plan(model, 1 / layout.units_total, "prune", tiny_tokenizer, calib_file)
    assert plan.pruned == [(0, 1)]  # layer 0 is a candidate too
    assert plan.notes["scores"][0][2] == 0.0


def test_prune_needs_a_tokenizer(tiny_llama):
    with pytest.raises(ValueError, match="tokenizer"):
        headshare.make_plan(tiny_llama(), 0.25, "prune")


@pytest.mark.parametrize("arch", sorted(TINY))
def test_baselines_run_on_every_architecture(arch, tiny_tokenizer, calib_file):
    model = tiny_model(arch)
    for method in BASELINES:
        plan = _plan(model, 0.3, method, tiny_tokenizer, calib_file)
        plan.validate(layout_of(model.config))


def test_output_energy_is_a_function_of_the_weights_and_the_text(tiny_llama, tiny_tokenizer, calib_file):
    first = output_energy(tiny_llama(num_hidden_layers=2), tiny_tokenizer, calib_file, calib_tokens=64)
    again = output_energy(tiny_llama(num_hidden_layers=2), tiny_tokenizer, calib_file, calib_tokens=64)
    assert torch.equal(again, first)  # equal weights in other tensors, computed afresh


# -- the registry and the configs -----------------------------------------------------------------------------

def test_registry_entries_describe_their_methods():
    assert list(METHODS)[0] == "directshare"  # the default, first in --method's choices
    assert set(METHODS) == {"directshare", "alignshare", "random", "layerwise", "prune", "actshare", "fitshare",
                            "fitprune", "basisshare", "choiceshare", "autoshare"}
    for name, m in METHODS.items():
        assert m.name == name and m.help and callable(m.fn)
        assert issubclass(m.config, headshare.MethodConfig)
        assert m.needs_tokenizer == ("calib" in m.config.options()), name
    assert METHODS["random"].config is headshare.RandomConfig
    assert headshare.RandomConfig.options() == {"seed": 0}


def test_plan_records_its_config_and_never_edits_the_model(tiny_llama, tiny_tokenizer, calib_file):
    model = tiny_llama(num_hidden_layers=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for method in BASELINES:
        plan = _plan(model, 0.5, method, tiny_tokenizer, calib_file)
        assert METHODS[method].config.from_dict(plan.config).to_dict() == plan.config  # a config that reads back
        assert plan.config["ratio"] == 0.5 and plan.fitted == {} and plan.base_sha1 is None
    assert _plan(model, 0.5, "prune", tiny_tokenizer, calib_file).config == \
        {"ratio": 0.5, "calib": calib_file, "calib_tokens": 128, "relative": True, "version": 1}
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method, option", [("directshare", "calib"), ("fitshare", "seed"), ("random", "metric"),
                                            ("prune", "window"), ("layerwise", "nope")])
def test_an_unknown_option_is_refused_by_name(method, option, tiny_llama, tiny_tokenizer):
    model = tiny_llama()
    with pytest.raises(ValueError, match=f"has no option '{option}'; its options: "):
        headshare.make_plan(model, 0.25, method, tokenizer=tiny_tokenizer, **{option: 1})
    with pytest.raises(ValueError, match=f"has no option '{option}'"):
        make_config(method, 0.25, **{option: 1})
    with pytest.raises(ValueError, match=f"has no option '{option}'"):
        parse_option(METHODS[method].config, f"{option}=1")


@pytest.mark.parametrize("method, options, message", [
    ("random", {"seed": 1.5}, "seed must be an integer"),
    ("directshare", {"metric": "qq"}, "metric must be one of"),
    ("prune", {"calib_tokens": 1}, "calib_tokens must be an integer >= 2"),
    ("actshare", {"window": 0}, "window must be an integer >= 1 or none"),
    ("directshare", {"ratio": 1.0}, r"ratio must be a number in \[0, 1\)"),
])
def test_bad_option_values_are_refused(method, options, message):
    with pytest.raises(ValueError, match=message):
        make_config(method, **{"ratio": 0.3, **options})


def test_parse_option_reads_each_option_by_its_type():
    fit = METHODS["fitshare"].config
    assert parse_option(fit, "rho=0.5") == ("rho", 0.5)
    assert parse_option(fit, "window=none") == ("window", None)
    assert parse_option(fit, "window=3") == ("window", 3)
    assert parse_option(fit, "heldout=false") == ("heldout", False)
    assert parse_option(fit, "calib-tokens=64") == ("calib_tokens", 64)
    assert parse_option(fit, "calib=a=b.txt") == ("calib", "a=b.txt")
    with pytest.raises(ValueError, match="option calib_tokens: 'many' is not"):
        parse_option(fit, "calib_tokens=many")
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_option(fit, "rho")
    with pytest.raises(ValueError, match="has no option 'ratio'"):  # the ratio has its own flag
        parse_option(fit, "ratio=0.3")


def test_a_registered_method_is_used_by_make_plan_and_refused_twice(tiny_llama, monkeypatch):
    from dataclasses import dataclass

    from headshare.plan import Assignment, new_plan

    # a copy of the registry for this test: registering must not leak into other tests
    registry = dict(METHODS)
    monkeypatch.setattr(headshare.methods.base, "METHODS", registry)
    monkeypatch.setattr(headshare.methods, "METHODS", registry)
    @dataclass
    class LastConfig(headshare.MethodConfig):
        source: int = 0

    @register_method("last-from-first", LastConfig, "every unit of the last layer borrows unit `source` of layer 0")
    def last_from_first(model, cfg, tokenizer, progress):
        layout = layout_of(model.config)
        return new_plan(model, "last-from-first", cfg.ratio,
                        assignments=[Assignment(layout.num_layers - 1, u, 0, cfg.source)
                                     for u in range(layout.units_per_layer)])

    assert headshare.methods.METHODS["last-from-first"].config is LastConfig
    model = tiny_llama(num_hidden_layers=3)
    plan = headshare.make_plan(model, 0.0, "last-from-first", source=1)
    assert plan.method == "last-from-first" and plan.config == {"ratio": 0.0, "source": 1, "version": 1}
    assert [(a.layer, a.source_unit) for a in plan.assignments] == [(2, 1), (2, 1)]
    with pytest.raises(ValueError, match="already registered"):
        register_method("last-from-first", LastConfig)(last_from_first)
    with pytest.raises(ValueError, match="either a config or a method name"):
        headshare.make_plan(model, LastConfig(), "random")

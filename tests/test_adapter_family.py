"""Invariants of every adapter kind x {nf4, int8, none} x every model family in qadapt's table.

Tiny random models built from configs, loaded and quantized by qadapt's real loader: bitsandbytes'
4-bit and 8-bit layers run on the CPU here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ENCODER_FAMILIES, TINY_TAGS, TINY_VOCAB, token_batch

from qadapt.adapters import (
    FAMILIES,
    DoRALinear,
    LoRALinear,
    ParallelAdapter,
    SeriesAdapter,
    TrainedHead,
    adapter_params,
    adapter_state_dict,
    attach_adapters,
    count_parameters,
    layer_dims,
    load_adapter_state_dict,
)
from qadapt.adapters.spec import AdapterSpec, adapter_spec
from qadapt.recipe import adapter_section
from qadapt.tasks.causal_lm import summed_token_loss
from qadapt.tasks.token_classification import summed_tag_loss

KINDS = ["lora", "dora", "series", "parallel"]
QUANTS = ["nf4", "int8", "none"]
# Every decoder, and BERT, in every storage; the other encoders share BERT's code paths but their own
# module names, so they run in NF4 only (test_token_classification.py loads one in int8 too), as do the
# later decoders: where their adapters go differs, how a linear is quantized does not (nn.Linear in all
# of them, and bitsandbytes' int8 path is the same for every family above). Unquantized, every decoder
# folds its adapters below.
LATER_DECODERS = ("gemma3_text", "gemma4_text", "smollm3", "granite", "olmo2", "qwen3_5_text", "lfm2",
                  "qwen3_moe", "gpt_oss")
FAMILY_QUANTS = [(family, quant) for family in FAMILIES for quant in QUANTS
                 if quant == "nf4" or (family not in ENCODER_FAMILIES and family not in LATER_DECODERS)
                 or family == "bert"]


def adapter_config(kind: str, family: str, **options) -> AdapterSpec:
    """Small adapters; bottlenecks on both sub-layers (OPT has no MLP block: beside its linears; a mixture of
    experts has no linear after its experts: series after the attention only)."""
    placement = "linears" if kind == "parallel" and FAMILIES[family].mlp is None else "both"
    if kind == "series" and FAMILIES[family].mlp_output is None:
        placement = "attention"
    defaults = dict(kind=kind, rank=4, alpha=8, dropout=0.0, bottleneck_size=8, placement=placement)
    return adapter_section({**defaults, **options}, "a recipe's adapter section")  # the keys of its kind


def logits(model, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_batch(seed, vocab=TINY_VOCAB)["input_ids"]).logits


def expected_trainable(model, wrapped: list[str], cfg: AdapterSpec) -> int:
    """The trainable-parameter formula of each kind, from the wrapped modules' sizes."""
    total = 0
    for name in wrapped:
        module = model.get_submodule(name)
        if isinstance(module, TrainedHead):  # an encoder's token classifier: trained whole
            total += module.base.weight.numel() + module.base.bias.numel()
            continue
        if isinstance(module, ParallelAdapter) and not isinstance(module.base, torch.nn.Linear):
            in_features = out_features = model.config.hidden_size  # beside a whole block
        else:
            in_features, out_features = layer_dims(module.base)
        if cfg.kind in ("lora", "dora"):
            total += cfg.rank * (in_features + out_features) + (out_features if cfg.kind == "dora" else 0)
        elif cfg.kind == "series":
            width = in_features if module.on_input else out_features
            total += 2 * cfg.bottleneck_size * width
        else:
            total += cfg.bottleneck_size * (in_features + out_features)
        total += 1 if cfg.kind in ("series", "parallel") and cfg.scale == "learned" else 0
    return total


@pytest.mark.parametrize("family, quant", FAMILY_QUANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_starts_as_the_base_model(load_family, kind, quant, family):
    """LoRA and DoRA always, bottlenecks with init `zero`: exactly the base model's output."""
    model = load_family(family, quant)
    before = logits(model)
    attach_adapters(model, adapter_config(kind, family, init="zero"))
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("family, quant", FAMILY_QUANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_training_moves_only_adapters_and_round_trips(load_family, kind, quant, family):
    model = load_family(family, quant)
    cfg = adapter_config(kind, family, init="bert", scale="learned")
    wrapped = attach_adapters(model, cfg)
    assert count_parameters(model)[0] == expected_trainable(model, wrapped, cfg)

    adapter_names = set(adapter_params(model))
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k not in adapter_names}
    adapters_before = {k: v.detach().clone() for k, v in adapter_params(model).items()}
    optimizer = torch.optim.AdamW(list(adapter_params(model).values()), lr=1e-2)
    model.train()
    for step in range(2):  # two steps: a factor that starts at zero lets its partner move on the second
        batch = token_batch(seed=step, vocab=TINY_VOCAB)
        if family in ENCODER_FAMILIES:
            summed_tag_loss(model, {**batch, "labels": batch["labels"] % len(TINY_TAGS)}).backward()
        else:
            summed_token_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, tensor in model.state_dict().items():
        if name not in adapter_names:
            assert torch.equal(tensor, frozen_before[name]), f"frozen tensor {name} changed"
    for name, param in adapter_params(model).items():
        assert not torch.equal(adapters_before[name], param), f"adapter weight {name} did not move"

    model.eval()
    trained = logits(model, seed=7)
    fresh = load_family(family, quant)
    attach_adapters(fresh, cfg)
    load_adapter_state_dict(fresh, adapter_state_dict(model))
    fresh.eval()
    assert torch.equal(logits(fresh, seed=7), trained)


PAPER_SIDES = {"gate_proj": "input", "up_proj": "input", "down_proj": "output"}  # LLM-Adapters' llama row


def wrapped_layout(model, wrapped: list[str]) -> dict[str, str]:
    """{module name: how it is adapted}, e.g. {'model.layers.0.mlp.down_proj': 'series-output'}."""
    layout = {}
    for name in wrapped:
        module = model.get_submodule(name)
        if isinstance(module, SeriesAdapter):
            layout[name] = "series-input" if module.on_input else "series-output"
        else:
            layout[name] = type(module).__name__
    return layout


def per_layer(layers: int, **suffixes: str) -> dict[str, str]:
    return {f"model.layers.{i}.{suffix.replace('__', '.')}": how
            for i in range(layers) for suffix, how in suffixes.items()}


@pytest.mark.parametrize("options, expected", [
    # LLM-Adapters' defaults for llama (BOTTLENECK_TARGET_MODULES + ADAPTER_TYPE tables).
    (dict(kind="series", placement="linears"),
     per_layer(2, mlp__gate_proj="series-input", mlp__up_proj="series-input", mlp__down_proj="series-output")),
    # The paper's LLaMA-7B series command: --target_modules '["up_proj", "gate_proj"]'.
    (dict(kind="series", placement="linears", targets=["up_proj", "gate_proj"]),
     per_layer(2, mlp__gate_proj="series-input", mlp__up_proj="series-input")),
    # AdapterP (--use_adapterp): the MLP's output projection only.
    (dict(kind="series", placement="mlp"), per_layer(2, mlp__down_proj="series-output")),
    # Houlsby: after attention and after the MLP.
    (dict(kind="series", placement="both"),
     per_layer(2, self_attn__o_proj="series-output", mlp__down_proj="series-output")),
    # The paper's LLaMA-7B parallel command: --use_parallel_adapter --target_modules '["up_proj", "down_proj"]'.
    (dict(kind="parallel", placement="linears", targets=["up_proj", "down_proj"]),
     per_layer(2, mlp__up_proj="ParallelAdapter", mlp__down_proj="ParallelAdapter")),
    # He et al.: beside the whole MLP block.
    (dict(kind="parallel", placement="mlp"), per_layer(2, mlp="ParallelAdapter")),
    (dict(kind="series", placement="linears", targets=["q_proj:input", "down_proj"]),
     per_layer(2, self_attn__q_proj="series-input", mlp__down_proj="series-output")),
])
def test_llama_placements_wrap_what_llm_adapters_wraps(load_tiny, options, expected):
    model = load_tiny("nf4")
    wrapped = attach_adapters(model, adapter_spec(bottleneck_size=8, **options))
    assert wrapped_layout(model, wrapped) == expected


def test_paper_bottleneck_shapes_on_llama(load_tiny):
    """mh_adapter: in -> b -> in; output_adapter: out -> b -> out; parallel: in -> b -> out."""
    model = load_tiny("nf4")
    attach_adapters(model, adapter_spec(kind="series", placement="linears", bottleneck_size=8))
    up, down = model.model.layers[0].mlp.up_proj, model.model.layers[0].mlp.down_proj
    assert (up.bottleneck.down.in_features, up.bottleneck.up.out_features) == (64, 64)  # hidden
    assert (down.bottleneck.down.in_features, down.bottleneck.up.out_features) == (64, 64)  # down's output
    model = load_tiny("nf4")
    attach_adapters(model, adapter_spec(kind="parallel", placement="linears", targets=["up_proj"], bottleneck_size=8))
    up = model.model.layers[0].mlp.up_proj
    assert (up.bottleneck.down.in_features, up.bottleneck.up.out_features) == (64, 128)


def test_series_and_parallel_follow_their_equations():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    x = torch.randn(3, 6)
    for kind, on_input in [("series", False), ("series", True), ("parallel", False)]:
        model = torch.nn.Sequential()
        model.add_module("proj", base)
        cfg = adapter_spec(kind=kind, placement="linears", targets=[f"proj:{'input' if on_input else 'output'}"]
                            if kind == "series" else ["proj"], bottleneck_size=3, init="bert", scale=0.5,
                            activation="gelu", dropout=0.0)
        from qadapt.adapters.placement import plan_adapters

        layer = plan_adapters(model, cfg)["proj"](base)
        down, up = layer.bottleneck.down.weight, layer.bottleneck.up.weight

        def bottleneck(h):
            return 0.5 * torch.nn.functional.gelu(h @ down.T) @ up.T

        if kind == "parallel":
            expected = base(x) + bottleneck(x)
        elif on_input:
            expected = base(x + bottleneck(x))
        else:
            expected = base(x) + bottleneck(base(x))
        torch.testing.assert_close(layer(x), expected)


def test_dora_follows_its_equation():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = DoRALinear(base, rank=2, alpha=4)
    torch.nn.init.normal_(layer.lora_b.weight)
    with torch.no_grad():
        layer.magnitude.mul_(1.5)
    x = torch.randn(3, 6)
    adapted = base.weight + 2.0 * layer.lora_b.weight @ layer.lora_a.weight
    direction = adapted / adapted.norm(dim=1, keepdim=True)
    expected = x @ (layer.magnitude[:, None] * direction).T + base.bias
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("quant", QUANTS)
def test_dora_weight_norm_matches_the_dequantized_weight(load_tiny, quant):
    """The norm is computed through the (quantized) layer; it must match ‖W + sBA‖ of the de-quantized W."""
    import bitsandbytes as bnb

    model = load_tiny(quant)
    attach_adapters(model, adapter_spec(kind="dora", rank=4, targets=["down_proj"]))
    layer = model.model.layers[0].mlp.down_proj
    torch.nn.init.normal_(layer.lora_b.weight, std=0.1)
    weight = layer.base.weight
    if quant == "nf4":
        weight = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    elif quant == "int8":
        row_scales = weight.SCB if weight.SCB is not None else layer.base.state.SCB  # moved after a forward
        weight = bnb.functional.int8_vectorwise_dequant(weight.data, row_scales)
    adapted = weight.float() + layer.scale * layer.lora_b.weight @ layer.lora_a.weight
    torch.testing.assert_close(layer.adapted_row_norms(), adapted.norm(dim=1), rtol=2e-3, atol=1e-4)


def test_lora_and_dora_wrap_conv1d_on_gpt2(load_family):
    model = load_family("gpt2", "none")
    wrapped = attach_adapters(model, adapter_spec(kind="dora", rank=4, targets=["c_attn"]))
    layer = model.get_submodule(wrapped[0])
    assert type(layer.base).__name__ == "Conv1D"
    assert layer.lora_a.in_features == 64 and layer.lora_b.out_features == 3 * 64
    assert isinstance(layer, LoRALinear)


@pytest.mark.parametrize("family, options, message", [
    ("llama", dict(kind="series", placement="linears", targets=["q_proj"]),
     "which side of 'q_proj'.*'q_proj:input' or 'q_proj:output'"),
    ("llama", dict(kind="series", placement="linears", targets=["q_proj:inside"]), "side 'inside'.*input or output"),
    ("llama", dict(kind="parallel", placement="linears", targets=["up_proj:input"]), "parallel adapter has no side"),
    ("opt", dict(kind="parallel", placement="mlp"), "opt has no MLP block.*placement: linears.*fc1, fc2"),
    ("llama", dict(kind="series", placement="linears", targets=["gate_prj:input"]),
     "gate_prj match no linear layer.*down_proj, gate_proj"),
    ("qwen3_moe", dict(kind="series", placement="mlp"), "qwen3_moe's MLP is a mixture of experts.*placement: attention"),
    ("gpt_oss", dict(kind="parallel", placement="linears"), "gpt_oss's MLP is a mixture of experts"),
])
def test_placement_mistakes_are_explained(load_family, family, options, message):
    from qadapt.errors import QadaptError

    with pytest.raises(QadaptError, match=message):
        attach_adapters(load_family(family, "none"), adapter_spec(**options))


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_family_works_with_explicit_linear_targets(load_family, kind):
    from qadapt.errors import QadaptError

    model = load_family("llama", "none")
    model.config.model_type = "something-new"
    with pytest.raises(QadaptError, match="something-new.*not in qadapt's family table.*q_proj"):
        attach_adapters(model, adapter_spec(kind=kind))
    targets = ["down_proj:output"] if kind == "series" else ["down_proj"]
    spec = adapter_section({"kind": kind, "placement": "linears", "targets": targets}, "adapter")
    assert len(attach_adapters(model, spec)) == 2


@pytest.mark.parametrize("recipe, expected", [
    ("llama7b-lora-math.yaml", per_layer(2, self_attn__q_proj="LoRALinear", self_attn__k_proj="LoRALinear",
                                         self_attn__v_proj="LoRALinear", mlp__up_proj="LoRALinear",
                                         mlp__down_proj="LoRALinear")),
    ("llama7b-series-math.yaml", per_layer(2, mlp__gate_proj="series-input", mlp__up_proj="series-input")),
    ("llama7b-parallel-math.yaml", per_layer(2, mlp__up_proj="ParallelAdapter", mlp__down_proj="ParallelAdapter")),
])
def test_paper_recipes_place_adapters_as_the_papers_commands(load_tiny, recipe, expected):
    from conftest import REPO

    from qadapt.recipe import load_recipe

    cfg = load_recipe(REPO / "recipes" / "paper" / recipe).adapter
    model = load_tiny("nf4")
    assert wrapped_layout(model, attach_adapters(model, cfg)) == expected


@pytest.mark.parametrize("foreach", [False, True])
def test_dora_norm_is_recomputed_after_every_optimizer_step(load_tiny, foreach):
    """The norm is cached between changes of A and B; a step (either AdamW implementation) must refresh it."""
    model = load_tiny("nf4")
    attach_adapters(model, adapter_spec(kind="dora", rank=4, dropout=0.0, targets=["down_proj"]))
    layer = model.model.layers[0].mlp.down_proj
    optimizer = torch.optim.AdamW(list(adapter_params(model).values()), lr=1e-2, foreach=foreach)
    model.train()
    for step in range(2):
        summed_token_loss(model, token_batch(seed=step, vocab=TINY_VOCAB)).backward()
        optimizer.step()
        optimizer.zero_grad()
        cached = layer.adapted_row_norms().clone()
        layer._norms_cache = None
        assert torch.equal(cached, layer.adapted_row_norms()), f"stale norm after step {step + 1}"


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ENCODER_FAMILIES])
def test_the_chunked_loss_is_the_models_own(load_family, family):
    """The loss computed from the head a chunk at a time is the model's own, Granite's scaled logits and
    Gemma's capped ones included (both set in the tiny configs)."""
    model = load_family(family, "none")
    batch = token_batch(vocab=TINY_VOCAB)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                     batch["labels"][:, 1:].flatten(), reduction="sum")
        assert summed_token_loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ENCODER_FAMILIES])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_a_folded_adapter_computes_what_it_did_unfolded(load_family, kind, family):
    """merge ≈ unmerged for every decoder: the fold qadapt merge runs (fp32, no quantization: exact)."""
    from qadapt.export.merge import fold_adapters

    model = load_family(family, "none").eval()
    attach_adapters(model, adapter_config(kind, family))
    base = logits(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("lora_b.weight", "magnitude")):
                param.add_(0.1 * torch.randn_like(param))  # B starts at zero: make the adapter change something
    unfolded = logits(model)
    assert not torch.allclose(unfolded, base, atol=1e-3)
    assert fold_adapters(model)
    assert not any(isinstance(m, (LoRALinear, DoRALinear)) for m in model.modules())
    torch.testing.assert_close(logits(model), unfolded, atol=1e-4, rtol=1e-4)

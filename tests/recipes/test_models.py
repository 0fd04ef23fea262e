"""The four language models: sizes, interface, gate layouts against the equations of docs/models.md, regularisers."""

from __future__ import annotations

import copy
import gc
import io
from collections.abc import Callable
from fnmatch import fnmatch

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_selfish.core.gates import detect_gate_layouts
from lightning_selfish_recipes.models import (
    ONLSTM,
    RHN,
    AWDLSTMMoS,
    LinearDropConnect,
    LMOutput,
    LockedDropout,
    StackedLSTM,
    WeightDrop,
    embedded_dropout,
)

V = 50
TINY: dict[str, Callable[..., nn.Module]] = {
    "lstm": lambda **kw: StackedLSTM(ntoken=V, ninp=16, nhid=16, nlayers=2, **{"dropout": 0.3, **kw}),
    "rhn": lambda **kw: RHN(ntoken=V, ninp=12, nhid=12, depth=3, **kw),
    "onlstm": lambda **kw: ONLSTM(ntoken=V, ninp=10, nhid=20, nlayers=3, chunk_size=5, **kw),
    "mos": lambda **kw: AWDLSTMMoS(ntoken=V, ninp=8, nhid=16, nhidlast=12, nlayers=3, n_experts=3, **kw),
}
NO_DROPOUT = {
    "lstm": dict(dropout=0.0),
    "rhn": dict(dropout_e=0.0, dropout_i=0.0, dropout_h=0.0, dropout_o=0.0),
    "onlstm": dict(dropout_e=0.0, dropout_i=0.0, dropout_h=0.0, dropout_o=0.0, wdrop=0.0),
    "mos": dict(dropout_e=0.0, dropout_i=0.0, dropout_h=0.0, dropout_o=0.0, dropout_l=0.0, wdrop=0.0),
}
T, B = 7, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core box each op waits on the other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(kind: str, seed: int = 0, dtype: torch.dtype = torch.float64, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return TINY[kind](**kw).to(dtype)


def tokens(seed: int = 1, steps: int = T, batch: int = B) -> Tensor:
    return torch.randint(0, V, (steps, batch), generator=torch.Generator().manual_seed(seed))


def flat(hidden) -> list[Tensor]:
    if isinstance(hidden, Tensor):
        return [hidden]
    return [t for h in hidden for t in flat(h)]


def maskable(model: nn.Module) -> dict[str, Tensor]:
    return {
        name: p
        for name, p in model.named_parameters()
        if "bias" not in name and not any(fnmatch(name, pat) for pat in model.sparsity_exclude)
    }


def lookup(layout: list[tuple[str, slice]]) -> dict[str, slice]:
    return dict(layout)


# --------------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "cls, total, n_maskable",
    [
        (StackedLSTM, 66_034_000, 66_000_000),
        (RHN, 23_484_060, 23_455_800),
        (ONLSTM, 25_232_180, 25_199_500),
        (AWDLSTMMoS, 34_909_528, 34_838_400),
    ],
)
def test_paper_size_parameter_counts_and_smoke_forward(cls, total, n_maskable):
    torch.manual_seed(0)
    model = cls()
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in maskable(model).values()) == n_maskable
    model.eval()
    with torch.no_grad():
        out = model(torch.randint(0, model.ntoken, (2, 2)), model.init_hidden(2))
    assert out.log_probs.shape == (4, model.ntoken)
    del model, out
    gc.collect()


def test_sparsified_tensor_names_follow_the_spec():
    """docs/models.md#which-tensors-are-sparse: which tensors carry a mask (names as in docs/models.md)."""
    assert sorted(maskable(tiny("lstm"))) == sorted(
        ["encoder.weight", "decoder.weight"] + [f"rnn.weight_{k}_l{j}" for k in ("ih", "hh") for j in (0, 1)]
    )
    assert sorted(maskable(tiny("rhn"))) == sorted(
        ["embedding.weight", "highways.0.W.weight"] + [f"highways.{j}.R.weight" for j in range(3)]
    )
    assert sorted(maskable(tiny("onlstm"))) == sorted(
        ["encoder.weight"] + [f"rnn.cells.{j}.{m}.weight" for j in range(3) for m in ("ih.0", "hh")]
    )
    assert sorted(maskable(tiny("mos"))) == sorted(
        ["encoder.weight", "latent.0.weight"]
        + [f"rnns.{j}.module.weight_ih_l0" for j in range(3)]
        + [f"rnns.{j}.weight_hh_l0_raw" for j in range(3)]
    )
    mos = tiny("mos")
    assert mos.sparsity_exclude == ["prior.weight"] and "prior.weight" in dict(mos.named_parameters())
    assert tiny("lstm").sparsity_exclude == tiny("rhn").sparsity_exclude == tiny("onlstm").sparsity_exclude == []


def test_defaults():
    for kind, (alpha, beta) in {"lstm": (0, 0), "rhn": (0, 0), "onlstm": (2, 1), "mos": (2, 1)}.items():
        model = tiny(kind)
        assert (model.alpha, model.beta) == (alpha, beta)


def test_tied_weights_are_one_parameter():
    lstm = tiny("lstm")
    assert lstm.decoder.weight is not lstm.encoder.weight
    rhn = tiny("rhn")
    assert rhn.fc1.weight is rhn.embedding.weight
    for kind in ("onlstm", "mos"):
        model = tiny(kind)
        assert model.decoder.weight is model.encoder.weight
    with pytest.raises(ValueError):
        RHN(ntoken=V, ninp=8, nhid=10)


def test_initialisation_conventions():
    for kind in TINY:
        model = tiny(kind)
        enc = model.embedding if kind == "rhn" else model.encoder
        dec = model.fc1 if kind == "rhn" else model.decoder
        assert enc.weight.abs().max() <= 0.1 and dec.weight.abs().max() <= 0.1
        assert torch.count_nonzero(dec.bias) == 0


# --------------------------------------------------------------------------------------------------- interface


@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize("train", [True, False])
def test_forward_shapes_and_normalisation(kind, train):
    model = tiny(kind).train(train)
    out = model(tokens(), model.init_hidden(B))
    assert isinstance(out, LMOutput)
    assert out.log_probs.shape == (T * B, V) and out.log_probs.dtype == torch.float64
    tol = 1e-5 if kind == "mos" else 1e-10  # MoS adds 1e-8 per word before the log
    torch.testing.assert_close(out.log_probs.exp().sum(-1), torch.ones(T * B, dtype=torch.float64), atol=tol, rtol=0)
    loss = F.nll_loss(out.log_probs, tokens(2).view(-1))
    if out.ar is not None:
        loss = loss + model.alpha * out.ar.pow(2).mean() + model.beta * (out.tar[1:] - out.tar[:-1]).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert any(t.requires_grad for t in flat(out.hidden))  # not detached


def test_hidden_state_shapes():
    lstm = tiny("lstm")
    h, c = lstm.init_hidden(B)
    assert h.shape == c.shape == (2, B, 16)
    assert tiny("rhn").init_hidden(B).shape == (B, 12)
    assert [(h.shape, c.shape) for h, c in tiny("onlstm").init_hidden(B)] == [
        ((B, 20), (B, 4, 5)),
        ((B, 20), (B, 4, 5)),
        ((B, 10), (B, 2, 5)),
    ]
    assert [(h.shape, c.shape) for h, c in tiny("mos").init_hidden(B)] == [
        ((1, B, 16), (1, B, 16)),
        ((1, B, 16), (1, B, 16)),
        ((1, B, 12), (1, B, 12)),
    ]
    for kind in TINY:
        model = tiny(kind)
        init = flat(model.init_hidden(B))
        assert all(t.dtype == torch.float64 and not t.any() for t in init)
        new = flat(model.eval()(tokens(), model.init_hidden(B)).hidden)
        assert [t.shape for t in new] == [t.shape for t in init]


@pytest.mark.parametrize("kind", list(TINY))
def test_eval_is_deterministic_and_hidden_carries_over(kind):
    model = tiny(kind).eval()
    x = tokens(steps=8)
    with torch.no_grad():
        a = model(x, model.init_hidden(B))
        b = model(x, model.init_hidden(B))
        torch.testing.assert_close(a.log_probs, b.log_probs, rtol=0, atol=0)
        first = model(x[:3], model.init_hidden(B))
        second = model(x[3:], first.hidden)
    torch.testing.assert_close(torch.cat([first.log_probs, second.log_probs]), a.log_probs)
    for got, want in zip(flat(second.hidden), flat(a.hidden)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", list(TINY))
def test_training_mode_is_stochastic(kind):
    model = tiny(kind).train()
    x = tokens()
    a = model(x, model.init_hidden(B)).log_probs
    b = model(x, model.init_hidden(B)).log_probs
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind, knob", [(kind, knob) for kind in TINY for knob in NO_DROPOUT[kind]])
def test_each_dropout_site_acts_in_training_only(kind, knob):
    model = tiny(kind, **dict(NO_DROPOUT[kind], **{knob: 0.5}))
    x = tokens()
    a = model.train()(x, model.init_hidden(B))
    b = model(x, model.init_hidden(B))
    assert not torch.allclose(a.log_probs, b.log_probs)
    model.eval()
    torch.testing.assert_close(model(x, model.init_hidden(B)), model(x, model.init_hidden(B)), rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(TINY))
def test_without_dropout_training_equals_eval(kind):
    model = tiny(kind, **NO_DROPOUT[kind])
    x = tokens()
    torch.testing.assert_close(
        model.train()(x, model.init_hidden(B)).log_probs, model.eval()(x, model.init_hidden(B)).log_probs
    )


def test_stacked_lstm_uses_its_one_rate_at_three_places():
    model = tiny("lstm").train()
    calls = []
    model.drop.register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    model(tokens(), model.init_hidden(B))
    assert calls == [(T, B, 16), (T, B, 16)]  # embeddings and top output
    assert model.drop.p == model.rnn.dropout == 0.3  # and between the LSTM layers
    assert StackedLSTM().rnn.dropout == 0.65


def test_onlstm_hidden_dropout_sits_between_layers_only():
    model = tiny("onlstm").train()
    calls, top = [], []
    model.rnn.lockdrop.register_forward_hook(lambda mod, args, out: calls.append(out))
    model.rnn.cells[-1].register_forward_hook(lambda mod, args, out: top.append(out[0]))
    out = model(tokens(), model.init_hidden(B))
    assert len(calls) == 2 and out.ar is top[0] and out.tar is top[0]


def test_ar_tar_tensors():
    for kind in ("lstm", "rhn"):
        out = tiny(kind)(tokens(), tiny(kind).init_hidden(B))
        assert out.ar is None and out.tar is None
    x = tokens()

    # ON-LSTM: AR and TAR both on the *undropped* top layer, even with the output dropout active.
    only_out = dict(NO_DROPOUT["onlstm"], dropout_o=0.5)
    model = tiny("onlstm", **only_out)
    ref = model.eval()(x, model.init_hidden(B)).ar
    out = model.train()(x, model.init_hidden(B))
    assert out.ar is out.tar and out.ar.shape == (T, B, 10)
    torch.testing.assert_close(out.ar, ref)

    # MoS: AR on the dropped output, TAR on the raw last-layer output.
    only_out = dict(NO_DROPOUT["mos"], dropout_o=0.5)
    model = tiny("mos", **only_out)
    ref = model.eval()(x, model.init_hidden(B)).tar
    out = model.train()(x, model.init_hidden(B))
    assert out.ar.shape == out.tar.shape == (T, B, 12)
    torch.testing.assert_close(out.tar, ref)
    ratio = out.ar / out.tar
    assert set(ratio.unique().tolist()) <= {0.0, 2.0} and (ratio == 0).any()
    assert (ratio == ratio[:1]).all()  # one locked mask over time


# --------------------------------------------------------------------------------------------------- gate layouts


def test_gate_layouts_are_detected_and_tile_rows():
    expected = {
        "lstm": {f"rnn.weight_{k}_l{j}" for k in ("ih", "hh") for j in (0, 1)},
        "rhn": {"highways.0.W.weight"} | {f"highways.{j}.R.weight" for j in range(3)},
        "onlstm": {f"rnn.cells.{j}.{m}.weight" for j in range(3) for m in ("ih.0", "hh")},
        "mos": {f"rnns.{j}.module.weight_ih_l0" for j in range(3)} | {f"rnns.{j}.weight_hh_l0_raw" for j in range(3)},
    }
    gate_names = {
        "lstm": ["i", "f", "g", "o"],
        "rhn": ["H", "T"],
        "onlstm": ["mi", "mf", "o", "c", "i", "f"],
        "mos": ["i", "f", "g", "o"],
    }
    for kind, names in expected.items():
        model = tiny(kind)
        layouts = detect_gate_layouts(model)  # raises if a declaration does not tile its tensor
        assert set(layouts) == names
        params = dict(model.named_parameters())
        for name, layout in layouts.items():
            assert [g for g, _ in layout] == gate_names[kind]
            assert layout[0][1].start == 0 and layout[-1][1].stop == params[name].shape[0]
            assert all(a[1].stop == b[1].start for a, b in zip(layout, layout[1:]))
    cell = tiny("onlstm").rnn.cells[0]
    assert cell.gate_layouts["hh.weight"] == [
        ("mi", slice(0, 4)),
        ("mf", slice(4, 8)),
        ("o", slice(8, 28)),
        ("c", slice(28, 48)),
        ("i", slice(48, 68)),
        ("f", slice(68, 88)),
    ]
    for k in range(3):
        mos = tiny("mos")
        size = mos.rnns[k].module.hidden_size
        assert mos.rnns[k].gate_layouts == {
            "weight_hh_l0_raw": [(g, slice(j * size, (j + 1) * size)) for j, g in enumerate("ifgo")]
        }


def lstm_reference(x, h, c, w_ih, w_hh, b_ih, b_hh, lay_ih, lay_hh):
    """LSTM equations, each gate read from its declared rows."""
    outs = []
    for t in range(x.size(0)):

        def pre(g, xt=x[t], h=h):
            return xt @ w_ih[lay_ih[g]].T + b_ih[lay_ih[g]] + h @ w_hh[lay_hh[g]].T + b_hh[lay_hh[g]]

        i, f, o, g = torch.sigmoid(pre("i")), torch.sigmoid(pre("f")), torch.sigmoid(pre("o")), torch.tanh(pre("g"))
        c = f * c + i * g
        h = o * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


def test_stacked_lstm_matches_gate_equations():
    model = tiny("lstm").eval()
    layouts = {n: lookup(lay) for n, lay in detect_gate_layouts(model).items()}
    x = tokens()
    out = model(x, model.init_hidden(B))
    layer_in = model.encoder(x)
    zeros = torch.zeros(B, 16, dtype=torch.float64)
    for j in range(2):
        r = model.rnn
        layer_in, _, _ = lstm_reference(
            layer_in, zeros, zeros,
            getattr(r, f"weight_ih_l{j}"), getattr(r, f"weight_hh_l{j}"),
            getattr(r, f"bias_ih_l{j}"), getattr(r, f"bias_hh_l{j}"),
            layouts[f"rnn.weight_ih_l{j}"], layouts[f"rnn.weight_hh_l{j}"],
        )  # fmt: skip
    torch.testing.assert_close(out.log_probs, F.log_softmax(model.decoder(layer_in.view(-1, 16)), -1))


def rhn_reference(model: RHN, x: Tensor, s: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrence (docs/models.md#model-b-rhn-ptb), H and T read from the declared rows; one mask for all steps."""
    layouts = {n: lookup(lay) for n, lay in detect_gate_layouts(model).items()}
    outs = []
    for t in range(x.size(0)):
        for j, blk in enumerate(model.highways):

            def pre(g, j=j, blk=blk, s=s, xt=x[t]):
                rows = layouts[f"highways.{j}.R.weight"][g]
                v = (s * mask) @ blk.R.weight[rows].T + blk.R.bias[rows]
                if j == 0:
                    rows = layouts["highways.0.W.weight"][g]
                    v = v + xt @ blk.W.weight[rows].T + blk.W.bias[rows]
                return v

            h, gate = torch.tanh(pre("H")), torch.sigmoid(pre("T"))
            s = h * gate + s * (1 - gate)
        outs.append(s)
    return torch.stack(outs), s


def test_rhn_matches_equations_with_one_hidden_mask_per_window():
    model = tiny("rhn", **dict(NO_DROPOUT["rhn"], dropout_h=0.5)).train()
    x = tokens()
    s0 = torch.randn(B, 12, dtype=torch.float64)
    torch.manual_seed(5)
    out = model(x, s0)
    torch.manual_seed(5)
    mask = model.sample_hidden_mask(s0)
    assert mask is not None and (mask == 0).any() and set(mask.unique().tolist()) == {0.0, 2.0}
    ref_out, ref_s = rhn_reference(model, model.embedding(x), s0, mask)
    torch.testing.assert_close(out.hidden, ref_s)
    torch.testing.assert_close(out.log_probs, F.log_softmax(model.fc1(ref_out.view(-1, 12)), -1))
    # eval: no mask
    model.eval()
    ref_out, _ = rhn_reference(model, model.embedding(x), s0, torch.ones(()))
    torch.testing.assert_close(model(x, s0).log_probs, F.log_softmax(model.fc1(ref_out.view(-1, 12)), -1))


def test_rhn_gate_rows_by_marker():
    """Transform gate forced open and candidate rows set to a constant: every state becomes tanh(0.5)."""
    model = tiny("rhn").eval()
    with torch.no_grad():
        for blk in model.highways:
            for lin_name, layout in blk.gate_layouts.items():
                lin = getattr(blk, lin_name.split(".")[0])
                rows = lookup(layout)
                lin.weight[rows["T"]] = 0.0
                lin.bias[rows["T"]] = 50.0 if lin is blk.R else 0.0
                lin.weight[rows["H"]] = 0.0
                lin.bias[rows["H"]] = 0.5 if lin is blk.R else 0.0
    out = model(tokens(), torch.randn(B, 12, dtype=torch.float64))
    torch.testing.assert_close(out.hidden, torch.full((B, 12), 0.5, dtype=torch.float64).tanh())


def onlstm_reference(cell, x, h, c, w_hh):
    """The cell's equations (docs/models.md#model-c-on-lstm-ptb), every gate read from its declared rows."""
    lay_ih, lay_hh = lookup(cell.gate_layouts["ih.0.weight"]), lookup(cell.gate_layouts["hh.weight"])
    w_ih, b_ih, b_hh = cell.ih[0].weight, cell.ih[0].bias, cell.hh.bias
    c = c.reshape(c.size(0), -1)
    outs = []
    for t in range(x.size(0)):

        def pre(g, xt=x[t], h=h):
            return xt @ w_ih[lay_ih[g]].T + b_ih[lay_ih[g]] + h @ w_hh[lay_hh[g]].T + b_hh[lay_hh[g]]

        def expand(v):
            return v.repeat_interleave(cell.chunk_size, dim=1)

        f_master = expand(torch.cumsum(torch.softmax(pre("mf"), -1), -1))
        i_master = expand(1 - torch.cumsum(torch.softmax(pre("mi"), -1), -1))
        o, c_hat = torch.sigmoid(pre("o")), torch.tanh(pre("c"))
        i, f = torch.sigmoid(pre("i")), torch.sigmoid(pre("f"))
        omega = f_master * i_master
        f_hat = f * omega + (f_master - omega)
        i_hat = i * omega + (i_master - omega)
        c = f_hat * c + i_hat * c_hat
        h = o * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


def test_onlstm_matches_equations_eval():
    model = tiny("onlstm").eval()
    x = tokens()
    out = model(x, model.init_hidden(B))
    layer_in = model.encoder(x)
    for cell, (h, c), (h_new, c_new) in zip(model.rnn.cells, model.init_hidden(B), out.hidden):
        w_hh = cell.hh.weight * (1 - cell.hh.dropout)
        layer_in, h_ref, c_ref = onlstm_reference(cell, layer_in, h, c, w_hh)
        torch.testing.assert_close(h_new, h_ref)
        torch.testing.assert_close(c_new.reshape(B, -1), c_ref)
    torch.testing.assert_close(out.ar, layer_in)
    torch.testing.assert_close(out.log_probs, F.log_softmax(model.decoder(layer_in.view(-1, 10)), -1))


def test_onlstm_dropconnect_mask_is_drawn_once_per_forward():
    model = tiny("onlstm", wdrop=0.5).train()
    cell = model.rnn.cells[1]
    x = torch.randn(T, B, 20, dtype=torch.float64)
    h0, c0 = cell.init_hidden(B)
    torch.manual_seed(3)
    out, (h, c) = cell(x, (h0, c0))
    torch.manual_seed(3)
    w_hh = cell.hh.effective_weight()
    ref, h_ref, c_ref = onlstm_reference(cell, x, h0, c0, w_hh)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(c.reshape(B, -1), c_ref)


def test_mos_matches_equations_eval():
    model = tiny("mos").eval()
    layouts = {n: lookup(lay) for n, lay in detect_gate_layouts(model).items()}
    x = tokens()
    out = model(x, model.init_hidden(B))
    layer_in = model.encoder(x)
    for k, (wd, (h, c)) in enumerate(zip(model.rnns, model.init_hidden(B))):
        m = wd.module
        layer_in, h_ref, c_ref = lstm_reference(
            layer_in, h[0], c[0], m.weight_ih_l0, wd.weight_hh_l0_raw, m.bias_ih_l0, m.bias_hh_l0,
            layouts[f"rnns.{k}.module.weight_ih_l0"], layouts[f"rnns.{k}.weight_hh_l0_raw"],
        )  # fmt: skip
        torch.testing.assert_close(out.hidden[k][0][0], h_ref)
        torch.testing.assert_close(out.hidden[k][1][0], c_ref)
    torch.testing.assert_close(out.ar, layer_in)
    torch.testing.assert_close(out.tar, layer_in)
    latent = torch.tanh(model.latent[0](layer_in)).view(T * B, 3, 8)
    experts = torch.softmax(latent @ model.encoder.weight.T + model.decoder.bias, -1)  # (T*B, K, V)
    prior = torch.softmax(layer_in.view(T * B, 12) @ model.prior.weight.T, -1)
    ref = torch.log((prior.unsqueeze(-1) * experts).sum(1) + 1e-8)
    torch.testing.assert_close(out.log_probs, ref)


# --------------------------------------------------------------------------------------------------- regularisers


def make_weight_drop(p: float = 0.5) -> tuple[WeightDrop, nn.LSTM]:
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 6).double()
    ref = copy.deepcopy(lstm)
    return WeightDrop(lstm, dropout=p), ref


def test_weight_drop_parameters():
    wd, ref = make_weight_drop()
    names = [n for n, _ in wd.named_parameters()]
    assert sorted(names) == sorted(
        ["weight_hh_l0_raw", "module.weight_ih_l0", "module.bias_ih_l0", "module.bias_hh_l0"]
    )
    assert "weight_hh_l0" not in dict(wd.module.named_parameters())
    assert sum(p.numel() for p in wd.parameters()) == sum(p.numel() for p in ref.parameters())
    torch.testing.assert_close(wd.weight_hh_l0_raw, ref.weight_hh_l0)  # keeps the LSTM's own init
    with pytest.raises(ValueError):
        WeightDrop(nn.LSTM(2, 3), weights=("weight_xx",))


def test_weight_drop_eval_equals_plain_lstm_with_raw_weight():
    wd, ref = make_weight_drop()
    x = torch.randn(T, B, 5, dtype=torch.float64)
    hx = (torch.randn(1, B, 6, dtype=torch.float64), torch.randn(1, B, 6, dtype=torch.float64))
    with torch.no_grad():
        wd.weight_hh_l0_raw.mul_(1.5)
        ref.weight_hh_l0.copy_(wd.weight_hh_l0_raw)
    out, (h, c) = wd.eval()(x, hx)
    ref_out, (ref_h, ref_c) = ref(x, hx)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(c, ref_c)


def test_weight_drop_training():
    wd, ref = make_weight_drop(0.5)
    wd.train()
    x = torch.randn(T, B, 5, dtype=torch.float64)
    a, _ = wd(x)
    b, _ = wd(x)
    assert not torch.allclose(a, b)
    (a.sum() + b.sum()).backward()
    assert wd.weight_hh_l0_raw.grad is not None and wd.weight_hh_l0_raw.grad.abs().sum() > 0
    assert wd.module.weight_ih_l0.grad is not None
    # the training weight is exactly F.dropout(raw, p): element-wise, inverted scaling, one draw per call
    torch.manual_seed(11)
    out, _ = wd(x)
    torch.manual_seed(11)
    with torch.no_grad():
        ref.weight_hh_l0.copy_(F.dropout(wd.weight_hh_l0_raw, 0.5, True))
    torch.testing.assert_close(out, ref(x)[0])


def test_weight_drop_module_stays_copyable_and_movable():
    model = tiny("mos", dtype=torch.float32).train()
    out = model(tokens(), model.init_hidden(B))
    out.log_probs.sum().backward()
    clone = copy.deepcopy(model)  # no non-leaf tensors left behind in the LSTMs
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    clone.load_state_dict(torch.load(buf))
    clone = clone.double().eval()
    model = model.double().eval()
    torch.testing.assert_close(
        clone(tokens(), clone.init_hidden(B)).log_probs, model(tokens(), model.init_hidden(B)).log_probs
    )
    assert all(t.dtype == torch.float64 for t in flat(clone.init_hidden(2)))


def test_linear_dropconnect_semantics():
    torch.manual_seed(0)
    lin = LinearDropConnect(40, 50, dropout=0.3).double()
    x = torch.randn(4, 40, dtype=torch.float64)
    lin.eval()
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight * 0.7, lin.bias))
    lin.train()
    w1, w2 = lin.effective_weight(), lin.effective_weight()
    for w in (w1, w2):
        kept = w != 0
        torch.testing.assert_close(w[kept], lin.weight[kept])  # not rescaled
        assert abs((~kept).double().mean().item() - 0.3) < 0.06
    assert not torch.equal(w1 != 0, w2 != 0)  # resampled
    w1.sum().backward()
    assert lin.weight.grad is not None
    torch.manual_seed(4)
    y = lin(x)
    torch.manual_seed(4)
    torch.testing.assert_close(y, F.linear(x, lin.effective_weight(), lin.bias))  # the bias is never dropped
    assert LinearDropConnect(3, 4, dropout=0.0).train().effective_weight() is not None


def test_embedded_dropout_matches_masked_matrix_formulation():
    torch.manual_seed(0)
    emb = nn.Embedding(V, 6).double()
    words = tokens(steps=20, batch=4)
    torch.manual_seed(9)
    out = embedded_dropout(emb, words, 0.4)
    (out * torch.arange(6.0, dtype=torch.float64)).sum().backward()
    grad, emb.weight.grad = emb.weight.grad, None
    torch.manual_seed(9)
    mask = emb.weight.new_empty(V, 1).bernoulli_(0.6) / 0.6
    ref = F.embedding(words, mask * emb.weight)
    (ref * torch.arange(6.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, emb.weight.grad)
    # whole word types vanish, the rest scaled by 1/(1-p)
    ratio = out / emb(words)
    for w in words.unique():
        vals = ratio[words == w]
        assert torch.allclose(vals, torch.zeros_like(vals)) or torch.allclose(vals, torch.full_like(vals, 1 / 0.6))
    assert torch.equal(embedded_dropout(emb, words, 0.0), emb(words))


def test_locked_dropout_shares_one_mask_over_time():
    drop = LockedDropout(0.5)
    x = torch.ones(9, 4, 30)
    y = drop.train()(x)
    assert (y == y[:1]).all() and set(y.unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(drop(x), y)
    assert drop.eval()(x) is x
    assert LockedDropout(0.0).train()(x) is x

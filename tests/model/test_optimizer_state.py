"""Optimiser checkpoints are matched to parameters by name, so resume survives module reorganisation."""

import pytest
import torch

from cobra_scale.config import load_config
from cobra_scale.errors import CobraError, ConfigError
from cobra_scale.model.cobra import CobraModel
from cobra_scale.model.config import CobraConfig
from cobra_scale.train.configs import TrainConfig
from cobra_scale.train.trainer import load_optimizer_checkpoint, make_optimizer, make_scheduler, optimizer_checkpoint, optimizer_groups


def small(*overrides):
    torch.manual_seed(0)
    cfg = load_config(TrainConfig, dotlist=["data=x", "ids=y", "out=z", "warmup_steps=2", *overrides])
    mcfg = CobraConfig(levels=2, codes=4, d_model=16, decoder_layers=1, decoder_heads=2, encoder_layers=1, encoder_heads=2,
                       encoder_dim=16, text_tokens=6, vocab_size=50, max_items=5, prefix_rows=16)
    model = CobraModel(mcfg)
    opt = make_optimizer(model, cfg)
    return model, opt, make_scheduler(opt, cfg, 10), cfg


def step(model, opt, sched):
    loss = sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def states_by_name(model, opt):
    return {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters() if p in opt.state}


def round_trip(build):
    """Step an optimiser of ``build()``, save it, load it into a fresh ``build()``; check every state came back on its
    parameter. Returns ``(saved, sched, opt2, sched2)``."""
    model, opt, sched, _ = build()
    step(model, opt, sched)
    saved = optimizer_checkpoint(model, opt, sched)
    model2, opt2, sched2, _ = build()
    load_optimizer_checkpoint(model2, opt2, sched2, saved)
    a, b = states_by_name(model, opt), states_by_name(model2, opt2)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    return saved, sched, opt2, sched2


def test_round_trip_restores_every_state_on_its_parameter():
    _, sched, _, sched2 = round_trip(small)
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_checkpoint_of_the_old_parameter_order_loads():
    """Before the temperature became a module it was the first parameter without decay."""
    model, _, _, cfg = small()
    params = dict(model.named_parameters())
    decay, no_decay = optimizer_groups(model)
    legacy_no_decay = ["temp.log_temperature"] + [n for n in no_decay if n != "temp.log_temperature"]
    old = torch.optim.AdamW([{"params": [params[n] for n in decay], "weight_decay": 0.01},
                             {"params": [params[n] for n in legacy_no_decay], "weight_decay": 0.0}], lr=1e-3)
    old_sched = make_scheduler(old, cfg, 10)
    step(model, old, old_sched)
    saved = {"optimizer": old.state_dict(), "scheduler": old_sched.state_dict()}  # no param_names: session-2 format
    model2, opt2, sched2, _ = small()
    load_optimizer_checkpoint(model2, opt2, sched2, saved)
    a, b = states_by_name(model, old), states_by_name(model2, opt2)
    assert all(torch.equal(a[n], b[n]) for n in a) and len(b) == len(a)


def test_optimizer_state_of_another_model_is_refused():
    model, opt, sched, _ = small()
    saved = optimizer_checkpoint(model, opt, sched)
    saved["param_names"] = saved["param_names"][:-1]
    with pytest.raises(CobraError, match="different model"):
        load_optimizer_checkpoint(*small()[:3], saved)


def with_id_decay(wd=0.5):
    model, _, _, cfg = small()
    cfg.id_weight_decay = wd
    opt = make_optimizer(model, cfg)
    return model, opt, make_scheduler(opt, cfg, 10), cfg


def test_id_weight_decay_decays_the_id_rows_only():
    model, opt, sched, _ = with_id_decay(0.5)
    assert len(opt.param_groups) == 3 and opt.param_groups[2]["weight_decay"] == 0.5
    id_names = optimizer_groups(model, id_rows=True)[2]
    assert id_names and all(n.startswith(("code_emb.", "prefix_emb.")) for n in id_names)
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.data.fill_(1.0)
    before = {n: p.detach().clone() for n, p in params.items()}
    for p in model.parameters():  # zero gradients: AdamW then moves a parameter by its decay alone
        p.grad = torch.zeros_like(p)
    opt.step()
    lr = opt.param_groups[2]["lr"]
    for n, p in params.items():
        if n in id_names:
            assert torch.allclose(p, before[n] * (1 - lr * 0.5)), n
        elif "emb" in n:  # the other embeddings (item, type, position, tokens) keep no decay
            assert torch.equal(p, before[n]), n


def test_round_trip_with_id_weight_decay_and_a_changed_setting_is_refused():
    saved, _, opt2, _ = round_trip(with_id_decay)
    assert opt2.param_groups[2]["weight_decay"] == 0.5
    with pytest.raises(CobraError, match="id_weight_decay"):
        load_optimizer_checkpoint(*small()[:3], saved)


def test_negative_weight_decay_is_a_config_error():
    from cobra_scale.errors import ConfigError

    with pytest.raises(ConfigError, match="id_weight_decay"):
        load_config(TrainConfig, dotlist=["data=x", "ids=y", "out=z", "id_weight_decay=-1"])


def with_successor_decay(wd=0.3, id_wd=0.0):
    torch.manual_seed(0)
    cfg = load_config(TrainConfig, dotlist=["data=x", "ids=y", "out=z", "warmup_steps=2", "model.successor_embedding=true",
                                            f"successor_weight_decay={wd}", f"id_weight_decay={id_wd}"])
    mcfg = CobraConfig(levels=2, codes=4, d_model=16, decoder_layers=1, decoder_heads=2, encoder_layers=1, encoder_heads=2,
                       encoder_dim=16, text_tokens=6, vocab_size=50, max_items=5, prefix_rows=16, successor_embedding=True,
                       catalogue_items=12)
    model = CobraModel(mcfg)
    opt = make_optimizer(model, cfg)
    return model, opt, make_scheduler(opt, cfg, 10), cfg


def decay_alone(model, opt):
    """Parameters after one AdamW step with zero gradients (so each moves by its decay alone), from all ones."""
    for p in model.parameters():
        p.data.fill_(1.0)
        p.grad = torch.zeros_like(p)
    opt.step()
    return dict(model.named_parameters())


@pytest.mark.parametrize("id_wd", [0.0, 0.5])
def test_successor_weight_decay_decays_the_successor_rows_only(id_wd):
    model, opt, _, _ = with_successor_decay(0.3, id_wd)
    labels = [g["group"] for g in opt.param_groups]
    assert labels == ["decay", "no_decay"] + (["id_rows"] if id_wd else []) + ["successor_rows"]
    lr = opt.param_groups[-1]["lr"]
    for n, p in decay_alone(model, opt).items():
        if n.startswith("succ_emb."):
            assert torch.allclose(p, torch.full_like(p, 1 - lr * 0.3)), n
        elif n.startswith(("code_emb.", "prefix_emb.")):
            assert torch.allclose(p, torch.full_like(p, 1 - lr * id_wd)), n
        elif "emb" in n:  # item, type, position and token embeddings keep no decay
            assert torch.equal(p, torch.ones_like(p)), n


def test_round_trip_with_successor_decay_and_a_changed_setting_is_refused():
    saved, _, opt2, _ = round_trip(lambda: with_successor_decay(0.3, 0.5))
    assert [g["weight_decay"] for g in opt2.param_groups][2:] == [0.5, 0.3]
    without = lambda: with_successor_decay(0.0, 0.5)  # noqa: E731 - the same model, the rows back in the no-decay group
    with pytest.raises(CobraError, match="successor_weight_decay on .*now on and off"):
        load_optimizer_checkpoint(*without()[:3], saved)


def test_checkpoint_without_group_labels_loads():
    """Checkpoints before the labels (session 26) are read by their group count: decay, no_decay[, id_rows]."""
    saved, _, _, _ = round_trip(lambda: with_id_decay(0.5))
    for g in saved["optimizer"]["param_groups"]:
        del g["group"]
    model2, opt2, sched2, _ = with_id_decay(0.5)
    load_optimizer_checkpoint(model2, opt2, sched2, saved)
    assert [g["group"] for g in opt2.param_groups] == ["decay", "no_decay", "id_rows"]


def test_successor_weight_decay_without_the_rows_is_a_config_error():
    from cobra_scale.errors import ConfigError

    with pytest.raises(ConfigError, match="successor_embedding"):
        load_config(TrainConfig, dotlist=["data=x", "ids=y", "out=z", "successor_weight_decay=0.1"])
    with pytest.raises(ConfigError, match="successor_weight_decay"):
        load_config(TrainConfig, dotlist=["data=x", "ids=y", "out=z", "model.successor_embedding=true", "successor_weight_decay=-1"])


def with_impl(impl):
    return small(f"optimizer_impl={impl}")


def test_fused_and_foreach_take_the_same_steps():
    """optimizer_impl picks AdamW's kernel, not the algorithm: three steps of each agree to rounding."""
    runs = {}
    for impl in ("fused", "foreach"):
        model, opt, sched, _ = with_impl(impl)
        assert bool(opt.param_groups[0].get("fused")) == (impl == "fused")
        for _ in range(3):
            step(model, opt, sched)
        runs[impl] = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert runs["fused"].keys() == runs["foreach"].keys()
    for n, p in runs["fused"].items():
        torch.testing.assert_close(p, runs["foreach"][n], rtol=1e-5, atol=1e-6, msg=n)
    assert with_impl("auto")[1].param_groups[0]["fused"] is True


def test_resume_keeps_this_runs_implementation():
    """A checkpoint saved by the foreach kernel (every run before session 39) resumes on the kernel configured now."""
    model, opt, sched, _ = with_impl("foreach")
    step(model, opt, sched)
    saved = optimizer_checkpoint(model, opt, sched)
    model2, opt2, sched2, _ = with_impl("fused")
    load_optimizer_checkpoint(model2, opt2, sched2, saved)
    assert all(g["fused"] is True and not g.get("foreach") for g in opt2.param_groups)
    a, b = states_by_name(model, opt), states_by_name(model2, opt2)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    step(model2, opt2, sched2)  # and it steps


def test_unknown_optimizer_impl_is_refused():
    with pytest.raises(ConfigError, match="optimizer_impl"):
        load_config(TrainConfig, dotlist=["data=x", "ids=y", "out=z", "optimizer_impl=adam8bit"])

import copy
import functools
import hashlib
import inspect
import math
from dataclasses import fields, replace
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scfs.backbone import build_backbone
from scfs.config import Config, get_config
from scfs.model import (SCFS, Student, TeacherStudent, build_student, build_model, dino_term, search_term,
                        momentum_schedule, cosine_schedule)
from scfs.losses import collapse_state, koleo_loss, DINOLoss, SearchLoss
from scfs.search import search_features
from scfs.heads import DINOHead

B, N = 2, 3
# the official recipe's head settings, which were SCFS's own defaults before they became Config's (issue 14):
# most tests below were written for them (loss weights 1, no KoLeo, EMA centring, teacher temperature 0.04, no
# localisation term)
OFFICIAL = dict(head_bottleneck=256, head_bn=False, layer_weights=None, layer_out_dim=256, warmup_teacher_temp=0.04,
                teacher_temp=0.04, epochs=100, centering="ema", koleo_weight=0.0, loc_weight=0.0)


def _crops(seed=0, g=32, l=16):
    torch.manual_seed(seed)
    return [torch.randn(B, 3, g, g) for _ in range(2)] + [torch.randn(B, 3, l, l) for _ in range(N)]


def _model(method="scfs", seed=0, **kw):
    torch.manual_seed(seed)
    return SCFS("small", method=method, n_local=N, out_dim=64, head_hidden=32, **{**OFFICIAL, **kw})


def test_forward_keys_total_and_maps():
    m = _model()
    out = m(_crops(), epoch=0)
    layers = ("layer2", "layer3", "layer4")
    diag = {"teacher_entropy", "teacher_kl_uniform", "teacher_student_kl"}     # post-centring numbers (05_losses)
    diag |= {f"{h}/{k}" for h in ("dino",) + layers for k in ("raw_entropy", "mi", "emb_std")}   # collapse_stats
    assert set(out) == {"loss", "dino", "maps"} | diag | {f"{l}{t}" for l in layers for t in ("", "/global", "/local")}
    assert all(out[k].dim() == 0 and not out[k].requires_grad for k in diag)
    torch.testing.assert_close(out["loss"].detach(), out["dino"] + sum(out[l] for l in layers))
    for l in layers:
        torch.testing.assert_close(out[l], 0.5 * (out[f"{l}/global"] + out[f"{l}/local"]))
        assert out["maps"][l].shape[0] == N * B and not out["maps"][l].requires_grad
    assert isinstance(m.student, Student) and isinstance(m.teacher, Student)


def test_local_term_uses_searched_teacher_features():
    "Recompute layer4's local term by hand from the student/teacher modules and search_features."
    m = _model()
    crops = _crops()
    st_before = copy.deepcopy(m.state_dict())
    out = m(crops)
    m.load_state_dict(st_before)
    g, loc = torch.cat(crops[:2]), torch.cat(crops[2:])
    with torch.no_grad():
        s_loc_map = m.student["backbone"](loc)["layer4"]
        # the student BN sees the global batch first in the real forward; the local call uses batch stats anyway
        s_loc = m.student["layer_heads"]["layer4"](s_loc_map)
        t_map = m.teacher["backbone"](g)["layer4"]
        searched, _ = search_features(s_loc_map, t_map, N)
        t_s = m.teacher["layer_heads"]["layer4"](searched)
        ref = m.losses["layer4"].local_loss(s_loc, t_s)
    torch.testing.assert_close(out["layer4/local"], ref)


def test_dino_vs_scfs_same_dino_term_and_no_layer_heads():
    d, s = _model("dino", seed=5), _model("scfs", seed=5)
    od, os_ = d(_crops()), s(_crops())
    torch.testing.assert_close(od["dino"], os_["dino"])
    assert od["maps"] == {} and set(od) == {"loss", "dino", "maps", "teacher_entropy", "teacher_kl_uniform",
                                            "teacher_student_kl", "dino/raw_entropy", "dino/mi", "dino/emb_std"}
    assert not any("layer_heads." in k for k in d.state_dict())
    assert set(d.state_dict()) < set(s.state_dict())
    # the SCFS loss is the DINO model's loss plus exactly the three search terms (weight 1 each here)
    torch.testing.assert_close(os_["loss"].detach(), od["loss"].detach() + sum(os_[l] for l in ("layer2", "layer3", "layer4")))


def test_teacher_no_grad_train_mode_and_ema():
    m = _model()
    m(_crops())["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    m.eval()
    assert m.teacher.training and not m.student.training
    with torch.no_grad():
        for p in m.student.parameters():
            if p.requires_grad: p.add_(1.0)
    t0 = [p.clone() for p in m.teacher.parameters()]
    m.update_teacher(0.75)
    for a, t, s in zip(t0, m.teacher.parameters(), m.student.parameters()):
        torch.testing.assert_close(t, 0.75 * a + 0.25 * s)
    assert (m.teacher["head"].last_layer.parametrizations.weight.original0 == 1).all()


def test_one_step_lowers_loss():
    m = _model(seed=1)
    crops = _crops(1)
    opt = torch.optim.SGD([p for p in m.student.parameters() if p.requires_grad], lr=3e-5)  # tiny heads (hidden 32) are very sensitive: see nbs/06_model
    c = copy.deepcopy(m.losses.state_dict())
    out = m(crops)
    opt.zero_grad(); out["loss"].backward(); opt.step()
    m.losses.load_state_dict(c)
    with torch.no_grad():
        assert m(crops)["loss"].item() < out["loss"].item()


def test_options_and_errors():
    m = _model(search_layers=("layer4",), layer_weights=[2.0], search_keys="both", search_softmax=True)
    o = m(_crops())
    torch.testing.assert_close(o["loss"].detach(), o["dino"] + 2 * o["layer4"])
    assert o["maps"]["layer4"].shape[0] == 2 * N * B
    for bad in (dict(method="x"), dict(search_keys="y"), dict(search_layers=("layer1",)), dict(layer_weights=[1, 2])):
        with pytest.raises(ValueError): _model(**bad)


def test_state_dict_roundtrip_and_schedules():
    a, b = _model(seed=0), _model(seed=1)
    a(_crops())
    b.load_state_dict(a.state_dict(), strict=True)
    torch.testing.assert_close(b.losses["dino"].center, a.losses["dino"].center)
    ms = momentum_schedule(4, 3)
    assert len(ms) == 12 and ms[0] == 0.996 and ms[-1] < 1 and all(ms[1:] > ms[:-1])
    assert len(cosine_schedule(1.0, 0.0, 2, 5, warmup_epochs=1)) == 10


def test_distribute_single_process_gloo():
    "DDP wrapper (world size 1, gloo): same loss and grads, state_dict keys unchanged, deepcopy drops the wrapper."
    import socket
    import torch.distributed as dist
    sock = socket.socket(); sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]; sock.close()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        m, ref = _model(seed=2), _model(seed=2)
        keys = list(m.state_dict())
        m.distribute()
        assert "_ddp" in m.__dict__ and list(m.state_dict()) == keys
        crops = _crops(2)
        o, o2 = m(crops), ref(crops)
        o["loss"].backward(); o2["loss"].backward()
        torch.testing.assert_close(o["loss"], o2["loss"])
        for p, q in zip(m.student.parameters(), ref.student.parameters()):
            if p.requires_grad: torch.testing.assert_close(p.grad, q.grad)
        assert "_ddp" not in copy.deepcopy(m).__dict__
    finally:
        dist.destroy_process_group()


def test_diagnostics_recomputed_from_the_teacher_and_kl_from_probabilities():
    "Every diagnostic of the output recomputed from the restored modules; the KL term pair by pair from probabilities."
    m = _model(seed=3)
    crops = _crops(3)
    snap = copy.deepcopy(m.state_dict())
    out = m(crops, epoch=0)
    m.load_state_dict(snap)
    g, loc = torch.cat(crops[:2]), torch.cat(crops[2:])
    ent = lambda q: -(q * q.clamp_min(1e-12).log()).sum(-1)
    with torch.no_grad():
        tg = m.teacher["backbone"](g)
        z = m.teacher["head"].embed(tg["pooled"])
        logits = m.teacher["head"].last_layer(z)
        p = F.softmax(logits / 0.04, -1)
        torch.testing.assert_close(out["dino/raw_entropy"], ent(p).mean())
        torch.testing.assert_close(out["dino/mi"], ent(p.mean(0)) - ent(p).mean(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out["dino/emb_std"], z.std(0).mean() * math.sqrt(z.shape[1]))
        for l in ("layer2", "layer3", "layer4"):
            e = m.teacher["layer_heads"][l](tg[l])
            pl = F.softmax(e / 0.04, -1)
            torch.testing.assert_close(out[f"{l}/mi"], ent(pl.mean(0)) - ent(pl).mean(), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out[f"{l}/emb_std"], e.std(0).mean() * math.sqrt(e.shape[1]))
        pt = m.losses["dino"].teacher_probs(logits).view(2, B, -1)          # the centre as before the forward
        sb = m.student["backbone"]
        s_head = m.student["head"](torch.cat([sb(g)["pooled"], sb(loc)["pooled"]]))
        ls = F.log_softmax(s_head / 0.1, -1).view(2 + N, B, -1)
        kl = torch.stack([(pt[i] * (pt[i].clamp_min(1e-30).log() - ls[j])).sum(-1).mean()
                          for i in range(2) for j in range(2 + N) if i != j]).mean()
    torch.testing.assert_close(out["teacher_student_kl"], kl, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("centering", ["ema", "sinkhorn"])
def test_constant_teacher_features_read_constant_for_every_head(centering):
    m = _model(centering=centering)
    with torch.no_grad(): m.teacher["backbone"].net.conv1.weight.zero_()     # the same teacher features for every image
    out = m(_crops())
    heads = {"dino": 64, "layer2": 256, "layer3": 256, "layer4": 256}
    assert {h: collapse_state(out, k, prefix=h + "/") for h, k in heads.items()} == {h: "constant" for h in heads}
    assert out["dino/mi"] < 1e-4


class _SameForAll(torch.nn.Module):
    "Wraps a layer so that every row gets the output of the first row."
    def __init__(self, layer): super().__init__(); self.layer = layer
    def forward(self, z): return self.layer(z[:1]).expand(len(z), -1)


@pytest.mark.parametrize("centering", ["ema", "sinkhorn"])
def test_identical_teacher_logits_read_one_hot_through_the_model(centering):
    "A teacher DINO head that gives every image the same logits (its embeddings still differ): 'one-hot', not 'ok'."
    m = _model(centering=centering)
    head = m.teacher["head"]
    head.last_layer = _SameForAll(head.last_layer)                          # the same logits for every image
    out = m(_crops())
    assert collapse_state(out, 64, prefix="dino/") == "one-hot" and out["dino/mi"] < 1e-5
    assert out["dino/emb_std"] > 0.1


@functools.lru_cache(maxsize=1)
def _unforced_states() -> dict:
    return _states(_model()(_crops()))


def _states(out):
    "The collapse state of every head of `SCFS.forward`'s output (read from the raw statistics it returns)."
    return {h: collapse_state(out, k, prefix=h + "/") for h, k in {"dino": 64, "layer2": 256, "layer3": 256, "layer4": 256}.items()}


@pytest.mark.parametrize("layer", ["layer2", "layer3", "layer4"])
@pytest.mark.parametrize("kind", ["uniform", "one-hot", "constant"])
def test_forced_collapse_of_each_search_head_read_from_raw_statistics(layer, kind):
    """Force one teacher search head to collapse inside the model: 'uniform' (every image's logits nearly equal, the
    embeddings differ), 'one-hot' (every image the same peaked distribution, the embeddings differ) or 'constant' (one
    embedding for all). That head reads `kind`, every other head reads as it did unforced. Its loss's centre is set so
    that the post-centring numbers read otherwise (the shared peak centred away; a peak the raw outputs lack): only the
    raw statistics see the collapse."""
    base = _unforced_states()
    m = _model()
    head, K = m.teacher["layer_heads"][layer], 256
    peak, flat = F.one_hot(torch.tensor(3), K).float(), torch.full((K,), K ** -0.5)
    orig = head.embed
    head.embed = lambda x: (F.normalize(torch.ones_like(orig(x)), dim=-1) if kind == "constant" else
                            F.normalize(3.0 * (flat if kind == "uniform" else peak) + orig(x), dim=-1))
    centre = m.losses[layer].global_loss.center
    with torch.no_grad(): centre.copy_({"one-hot": 0.95 * peak, "uniform": -peak, "constant": 0 * peak}[kind])
    out = m(_crops())
    states = _states(out)
    assert base[layer] != kind and states[layer] == kind, (base, states)
    assert {h: v for h, v in states.items() if h != layer} == {h: v for h, v in base.items() if h != layer}
    post = m.losses[layer].stats                                            # post-centring: blind to it
    if kind != "constant":
        assert collapse_state(float(post["teacher_entropy"]), float(post["teacher_kl_uniform"]), K) != kind


# ---- the split of SCFS into pieces (issue 14) changed no number -------------------------------------------------------
LEGACY = dict(n_local=N, out_dim=64, head_hidden=32, head_bottleneck=256, head_bn=False, norm_last_layer=True,
              search_layers=("layer2", "layer3", "layer4"), layer_weights=None, layer_out_dim=256, search_softmax=False,
              search_keys="first", warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0, epochs=100,
              student_temp=0.1, center_momentum=0.9, layer_hidden=None, layer_bottleneck=None, search_temperature=1.0,
              centering="ema", koleo_weight=0.0, layer_init="kaiming")
OPTIONS = dict(n_local=N, out_dim=64, head_hidden=32, head_bottleneck=16, head_bn=True, norm_last_layer=False,
               search_layers=("layer3", "layer4"), layer_weights=(0.5, 2.0), layer_out_dim=16, search_softmax=True,
               search_keys="both", warmup_teacher_temp=0.02, teacher_temp=0.05, warmup_teacher_temp_epochs=2, epochs=5,
               student_temp=0.2, center_momentum=0.8, layer_hidden=24, layer_bottleneck=0.125, search_temperature=0.5,
               centering="sinkhorn", koleo_weight=0.1, layer_init="torch")
CASES = {"scfs": ("small", "scfs", LEGACY), "dino": ("small", "dino", LEGACY), "options": ("widths", "scfs", OPTIONS)}
REF = {  # recorded with the code before the split (6cfdfb5), torch.set_num_threads(1); compared with rtol 1e-4
    'scfs': {'dino': 4.069374084472656, 'teacher_entropy': 3.317180633544922,
        'teacher_kl_uniform': 0.5330843925476074, 'teacher_student_kl': 0.7521934509277344,
        'dino/raw_entropy': 3.317180633544922, 'dino/mi': 0.30861806869506836, 'dino/emb_std': 0.71518874168396,
        'layer2/global': 5.9347734451293945, 'layer2/local': 5.701576232910156, 'layer2': 5.818174839019775,
        'layer2/raw_entropy': 4.84847354888916, 'layer2/mi': 0.6742057800292969,
        'layer2/emb_std': 1.1510285139083862, 'layer3/global': 6.009698867797852, 'layer3/local': 5.735698223114014,
        'layer3': 5.872698783874512, 'layer3/raw_entropy': 4.821643829345703, 'layer3/mi': 0.6967735290527344,
        'layer3/emb_std': 1.1533381938934326, 'layer4/global': 5.944005966186523, 'layer4/local': 5.726799011230469,
        'layer4': 5.835402488708496, 'layer4/raw_entropy': 4.8023858070373535, 'layer4/mi': 0.715146541595459,
        'layer4/emb_std': 1.1517046689987183, 'loss': 21.59564971923828, 'maps/layer2': 207.86962890625,
        'maps/layer3': 45.72410583496094, 'maps/layer4': 7.997416973114014, 'grad': 8801.350969858082,
        'loss@1': 21.62934112548828, 'keys': 'c1d1041b1e79efb5'},
    'dino': {'dino': 4.069374084472656, 'teacher_entropy': 3.317180633544922,
        'teacher_kl_uniform': 0.5330843925476074, 'teacher_student_kl': 0.7521934509277344,
        'dino/raw_entropy': 3.317180633544922, 'dino/mi': 0.30861806869506836, 'dino/emb_std': 0.71518874168396,
        'loss': 4.069374084472656, 'grad': 4657.258967368376, 'loss@1': 4.102837562561035,
        'keys': '0c7908c5684a342d'},
    'options': {'dino': 4.928317070007324, 'teacher_entropy': 2.8753795623779297,
        'teacher_kl_uniform': 0.024522781372070312, 'teacher_student_kl': 2.0529375076293945,
        'dino/raw_entropy': 0.03946240246295929, 'dino/mi': 1.3823283910751343, 'dino/emb_std': 0.9566428661346436,
        'koleo': -0.05409521609544754, 'layer3/global': 4.393238067626953, 'layer3/local': 3.01298451423645,
        'layer3': 3.703111171722412, 'layer3/raw_entropy': 0.696619987487793, 'layer3/mi': 1.3861289024353027,
        'layer3/emb_std': 1.1510226726531982, 'layer4/global': 4.395684719085693, 'layer4/local': 3.214033842086792,
        'layer4': 3.804859161376953, 'layer4/raw_entropy': 0.7919392585754395, 'layer4/mi': 1.3839857578277588,
        'layer4/emb_std': 1.145782470703125, 'loss': 14.384181022644043, 'maps/layer3': 12.0, 'maps/layer4': 12.0,
        'grad': 34934.61181998318, 'loss@1': 14.367229461669922, 'keys': '554a7eb832f06832'},
}


def _fingerprint(case):
    "One fixed-seed step: every number of the output dict, the maps' sums, the student's gradient, a second forward."
    bb, method, kw = CASES[case]
    torch.manual_seed(0)
    m = SCFS(build_backbone("small", widths=(16, 32, 64, 128)) if bb == "widths" else bb, method=method,
             **{"loc_weight": 0.0, **kw})                                  # the old model had no localisation term
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)] + \
            [torch.randn(B, 3, 16, 16, generator=g) for _ in range(N)]
    o1 = m(crops, epoch=0); o1["loss"].backward()
    o2 = m(crops, epoch=1)                                                  # the centres moved by the first forward
    r = {k: v.item() for k, v in o1.items() if k != "maps"}
    r.update({f"maps/{l}": a.abs().sum().item() for l, a in o1["maps"].items()})
    r["grad"] = sum(p.grad.double().abs().sum() for p in m.student.parameters() if p.grad is not None).item()
    r["loss@1"] = o2["loss"].item()
    r["keys"] = hashlib.sha256("\n".join(m.state_dict()).encode()).hexdigest()[:16]   # checkpoints still load
    return r


@pytest.mark.parametrize("case", list(CASES))
def test_split_forward_gives_the_numbers_of_the_old_one(case):
    got, ref = _fingerprint(case), REF[case]
    assert list(got) == list(ref)                                           # same keys, in the same order
    assert got["keys"] == ref["keys"]
    bad = {k: (got[k], ref[k]) for k in ref if k != "keys" and not math.isclose(got[k], ref[k], rel_tol=1e-4, abs_tol=1e-6)}
    assert not bad, bad


# ---- defaults from Config, build_model --------------------------------------------------------------------------------
def _shared():
    names = {f.name for f in fields(Config)}
    return [k for k in inspect.signature(SCFS).parameters if k in names]


def test_scfs_defaults_are_config_defaults():
    params = inspect.signature(SCFS).parameters
    shared = _shared()
    assert {k: params[k].default for k in shared} == {k: getattr(Config, k) for k in shared}
    assert set(params) - set(shared) == {"layer_hidden", "search_temperature"}
    m = SCFS(n_local=2)                                                     # the tiny preset's heads and losses
    assert (m.losses["dino"].out_dim, m.losses["dino"].centering, m.koleo_weight) == (512, "sinkhorn", 0.1)
    assert m.layer_weights == {"layer2": 0.03, "layer3": 0.03, "layer4": 0.03}
    assert {h.out_dim for h in m.student["layer_heads"].values()} == {Config.layer_out_dim}
    assert m.losses["dino"].teacher_temp(0) == Config.teacher_temp and len(m.losses["dino"].teacher_temp_schedule) == Config.epochs


def test_tiny_defaults_forward_adds_koleo_and_weighted_layers():
    torch.manual_seed(0)
    from scfs.augment import random_geometry
    m = SCFS(n_local=N, out_dim=64, head_hidden=32)
    boxes, flips = random_geometry(B, 2 + N, generator=torch.Generator().manual_seed(0))
    out = m(_crops(), boxes=boxes, flips=flips)
    assert "koleo" in out and not out["koleo"].requires_grad and "loc" in out
    torch.testing.assert_close(out["loss"].detach(), out["dino"] + 0.1 * out["koleo"] +
                               sum(0.03 * out[l] for l in m.search_layers) + 1.0 * out["loc"])
    with pytest.raises(ValueError): m(_crops()[:2])                         # scfs needs local crops
    with pytest.raises(ValueError): m(_crops()[:1])


def _settings(m):
    "Every module's name, type and plain attributes, and every parameter's name, shape, flag and sum."
    plain = lambda v: v.tolist() if isinstance(v, np.ndarray) else repr(v)
    mods = [(n, type(x).__name__, {k: plain(v) for k, v in vars(x).items() if not k.startswith("_") and k != "training"})
            for n, x in m.named_modules()]
    return mods + [(n, tuple(p.shape), p.requires_grad, p.sum().item()) for n, p in m.named_parameters()]


ALT = dict(backbone="resnet18", backbone_kw=dict(widths=(8, 16, 32, 64)), method="dino", n_local=2, out_dim=32,
           head_hidden=48, head_bottleneck=32, head_bn=False, norm_last_layer=False, search_layers=("layer4",),
           layer_weights=(0.5, 1.0, 2.0), layer_out_dim=32, search_softmax=True, search_keys="both",
           warmup_teacher_temp=0.03, teacher_temp=0.05, warmup_teacher_temp_epochs=3, epochs=10, student_temp=0.2,
           center_momentum=0.8, layer_bottleneck=8, layer_init="torch", centering="ema", koleo_weight=0.0,
           loc_weight=0.5, loc_layers=("layer4",), loc_temp=0.2)
BASE = replace(Config(), backbone_kw={}, layer_weights=None, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=2)


def test_alt_covers_every_setting_scfs_accepts():
    assert set(ALT) == set(_shared()) | {"backbone_kw"}


@pytest.mark.parametrize("key", list(ALT))
def test_build_model_passes_every_setting(key):
    assert getattr(BASE, key) != ALT[key]
    torch.manual_seed(0); ref = _settings(build_model(BASE))
    torch.manual_seed(0); assert _settings(build_model(BASE)) == ref        # deterministic: a difference means something
    torch.manual_seed(0)
    assert _settings(build_model(replace(BASE, **{key: ALT[key]}))) != ref, f"build_model ignores {key}"


def test_build_model_of_a_preset():
    cfg = get_config("tiny", out_dim=64, head_hidden=32, head_bottleneck=16, layer_out_dim=16)
    torch.manual_seed(0); m = build_model(cfg)
    assert isinstance(m, SCFS) and m.student["backbone"].arch_kwargs == dict(widths=(16, 32, 64, 128))
    torch.manual_seed(0)
    ref = SCFS(build_backbone("small", widths=(16, 32, 64, 128)), n_local=cfg.n_local, out_dim=64, head_hidden=32,
               head_bottleneck=16, layer_out_dim=16)                        # everything else: the defaults = tiny's
    sm, sr = m.state_dict(), ref.state_dict()
    assert list(sm) == list(sr) and all(torch.equal(sm[k], sr[k]) for k in sm)


# ---- the pieces -------------------------------------------------------------------------------------------------------
def _toy_student(seed=0):
    torch.manual_seed(seed)
    return build_student(build_backbone("small", widths=(8, 16, 32, 64)), out_dim=32, head_hidden=16, head_bottleneck=8,
                         search_layers=("layer4",), layer_out_dim=16)


def test_build_student_dino_head_first():
    small = dict(out_dim=32, head_hidden=16, head_bottleneck=8, layer_out_dim=16)
    torch.manual_seed(0); a = build_student(build_backbone("small", widths=(8, 16, 32, 64)), **small)
    torch.manual_seed(0); b = build_student(build_backbone("small", widths=(8, 16, 32, 64)), search_layers=(), **small)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sb) < set(sa) and all(torch.equal(sa[k], sb[k]) for k in sb)
    assert {l: h.bottleneck for l, h in a["layer_heads"].items()} == {"layer2": 8, "layer3": 8, "layer4": 16}


def test_targets_are_the_heads_outputs_without_gradient():
    st = _toy_student()
    g = torch.randn(4, 3, 64, 64)
    s, t = st(g), st.targets(g)
    assert torch.equal(s["head"], t["head"]) and torch.equal(s["z"], t["z"])
    assert s["head"].requires_grad and not t["head"].requires_grad and t["layer4"].shape == (4, 64, 4, 4)


def test_teacher_student_mechanics_on_a_toy():
    ts = TeacherStudent(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    ts.eval(); assert ts.teacher.training and not ts.student.training
    with torch.no_grad():
        for p in ts.student.parameters(): p.add_(1.0)
    t0 = [p.clone() for p in ts.teacher.parameters()]
    ts.update_teacher(0.75)
    for a, t, s in zip(t0, ts.teacher.parameters(), ts.student.parameters()):
        torch.testing.assert_close(t, 0.75 * a + 0.25 * s)
    keys = list(ts.state_dict())
    ts.__dict__["_ddp"] = lambda x: "wrapped"
    assert ts.student_forward(torch.randn(2, 3)) == "wrapped" and list(ts.state_dict()) == keys
    assert "_ddp" not in copy.deepcopy(ts).__dict__
    ts.sync_batchnorm()
    assert isinstance(ts.teacher[1], nn.SyncBatchNorm) and list(ts.state_dict()) == keys


def test_dino_term_with_and_without_koleo():
    st = _toy_student()
    g, loc = torch.randn(4, 3, 64, 64), torch.randn(6, 3, 32, 32)
    s, t = st(g, loc), st.targets(g)
    crit = DINOLoss(32, 5)
    c0 = copy.deepcopy(crit.state_dict())
    term, out = dino_term(crit, s, t)
    crit.load_state_dict(c0)
    torch.testing.assert_close(term, crit(s["head"], t["head"]))
    assert "koleo" not in out and set(out) >= {"dino", "teacher_student_kl", "dino/mi"}
    crit.load_state_dict(c0)
    term_k, out_k = dino_term(crit, s, t, koleo_weight=2.0)
    koleo = (koleo_loss(s["z"][:2]) + koleo_loss(s["z"][2:])) / 2
    torch.testing.assert_close(term_k, term + 2.0 * koleo)
    torch.testing.assert_close(out_k["koleo"], koleo.detach())


@pytest.mark.parametrize("keys", ["first", "both"])
def test_search_term_equals_the_plain_computation(keys):
    st = _toy_student()
    g, loc = torch.randn(4, 3, 64, 64), torch.randn(6, 3, 32, 32)
    s, t = st(g, loc), st.targets(g)
    crit, th = SearchLoss(16), st["layer_heads"]["layer4"]
    c0 = copy.deepcopy(crit.state_dict())
    term, out, A = search_term(crit, th, s, t, "layer4", keys=keys, temperature=0.5)
    crit.load_state_dict(c0)
    with torch.no_grad():
        searched, A_ref = search_features(s["layer4/local_map"], t["layer4"], 3, keys=keys, temperature=0.5)
        ref = crit(s["layer4/global"], th(t["layer4"]), s["layer4/local"], th(searched))
    torch.testing.assert_close(A, A_ref)
    assert A.shape[0] == (2 if keys == "both" else 1) * 6 and not A.requires_grad and term.requires_grad
    for k in ("global", "local"): torch.testing.assert_close(out[f"layer4/{k}"], ref[k], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["layer4"], term.detach())


def test_localisation_term_needs_boxes_and_adds_to_the_loss():
    from scfs.augment import BatchMultiCrop
    v = BatchMultiCrop(global_size=32, local_size=16, n_local=N)(torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8),
                                                                torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    m = SCFS(n_local=N, out_dim=64, head_hidden=32, loc_weight=2.0)
    m0 = SCFS(n_local=N, out_dim=64, head_hidden=32, loc_weight=0.0)    # the same model without the term
    m0.load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="boxes"): m(v["crops"])
    out = m(v["crops"], boxes=v["boxes"], flips=v["flips"])
    torch.testing.assert_close(out["loss"].detach(), out["dino"] + 0.1 * out["koleo"] +
                               sum(0.03 * out[l] for l in m.search_layers) + 2.0 * out["loc"])
    out0 = m0(v["crops"])
    torch.testing.assert_close(out0["loss"].detach(), out["loss"].detach() - 2.0 * out["loc"])
    out["loss"].backward(); out0["loss"].backward()
    conv = lambda mm, l: getattr(mm.student["backbone"].net, l)[0].conv1.weight.grad
    assert not torch.allclose(conv(m, "layer2"), conv(m0, "layer2"))          # the term reaches the backbone
    with pytest.raises(ValueError): SCFS(n_local=N, out_dim=64, head_hidden=32, loc_layers=("layer1",))

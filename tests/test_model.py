import copy
import pytest
import torch
from scfs.model import SCFS, Student, momentum_schedule, cosine_schedule
from scfs.search import search_features
from scfs.heads import DINOHead

B, N = 2, 3


def _crops(seed=0, g=32, l=16):
    torch.manual_seed(seed)
    return [torch.randn(B, 3, g, g) for _ in range(2)] + [torch.randn(B, 3, l, l) for _ in range(N)]


def _model(method="scfs", seed=0, **kw):
    torch.manual_seed(seed)
    return SCFS("small", method=method, n_local=N, out_dim=64, head_hidden=32, **kw)


def test_forward_keys_total_and_maps():
    m = _model()
    out = m(_crops(), epoch=0)
    layers = ("layer2", "layer3", "layer4")
    diag = {"teacher_entropy", "teacher_kl_uniform", "teacher_student_kl"}     # collapse diagnostics (05_losses)
    assert set(out) == {"loss", "dino", "maps"} | diag | {f"{l}{t}" for l in layers for t in ("", "/global", "/local")}
    torch.testing.assert_close(out["teacher_student_kl"] + out["teacher_entropy"], out["dino"])
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
    assert od["maps"] == {} and set(od) == {"loss", "dino", "maps", "teacher_entropy", "teacher_kl_uniform", "teacher_student_kl"}
    assert not any("layer_heads." in k for k in d.state_dict())
    assert set(d.state_dict()) < set(s.state_dict())
    assert os_["loss"].item() > od["loss"].item()


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

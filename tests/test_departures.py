"The departures table (scfs.model.departures): every setting in which `tiny` differs from `tiny-official` or the official recipe has a row that explains it, and the arm each row names is the arm the models carry."
from dataclasses import asdict, replace

import pytest
import torch

from scfs.config import PRESETS, get_config, same_setting
from scfs.model import BOTH, SCFS_ONLY, NOT_RECIPE, build_model, departures, departures_markdown


def differing(a='tiny', b='tiny-official') -> set:
    "The recipe settings in which presets `a` and `b` differ."
    x, y = asdict(get_config(a)), asdict(get_config(b))
    return {k for k in x if k not in NOT_RECIPE and not same_setting(x[k], y[k])}


def unexplained(rows) -> list:
    return [r['setting'] for r in rows if r['arm'] not in (BOTH, SCFS_ONLY) or not r['why']]


def test_every_difference_has_a_row_with_an_explanation():
    rows = departures()
    names = [r['setting'] for r in rows]
    assert len(names) == len(set(names))
    assert differing('tiny', 'tiny-official') | differing('tiny', 'resnet50-imagenet') == set(names)
    assert not unexplained(rows), f'settings that differ without an explanation: {unexplained(rows)}'
    assert all(r['kind'] == 'objective' for r in rows if r['setting'] in differing('tiny', 'tiny-official'))


def test_a_new_difference_without_explanation_is_caught(monkeypatch):
    monkeypatch.setitem(PRESETS, 'tiny-official', {**PRESETS['tiny-official'], 'blur_sigma': (0.5, 1.0), 'student_temp': 0.2})
    rows = departures()
    assert set(unexplained(rows)) == {'blur_sigma', 'student_temp'}
    assert departures_markdown(rows).count('**no explanation**') == 2


@pytest.mark.parametrize('setting, official, tiny, tiny_official, arm', [
    ('centering', 'ema', 'sinkhorn', 'ema', BOTH),
    ('koleo_weight', 0.0, 0.1, 0.0, BOTH),
    ('head_bn', False, True, False, BOTH),
    ('freeze_last_layer', 1, 10 ** 6, 1, BOTH),
    ('p_shuffle', 0.0, 1.0, 0.0, BOTH),
    ('loc_weight', 0.0, 1.0, 0.0, BOTH),
    ('teacher_temp', 0.07, 0.02, ..., BOTH),                  # ...: whatever tiny-official sets
    ('layer_weights', None, (0.03, 0.03, 0.03), None, SCFS_ONLY),
    ('layer_init', 'torch', 'kaiming', 'torch', SCFS_ONLY),
    ('out_dim', 65536, 512, 512, BOTH),
])
def test_known_rows(setting, official, tiny, tiny_official, arm):
    r = {r['setting']: r for r in departures()}[setting]
    if tiny_official is ...: tiny_official = getattr(get_config('tiny-official'), setting)
    assert (r['official'], r['tiny'], r['tiny_official'], r['arm']) == (official, tiny, tiny_official, arm)
    assert r['official'] == getattr(get_config('resnet50-imagenet'), setting) and r['tiny'] == getattr(get_config('tiny'), setting)


def test_markdown_has_one_line_per_row():
    rows = departures()
    md = departures_markdown(rows).splitlines()
    assert len(md) == 2 + len(rows) and md[0].startswith('| setting | official')
    line = next(l for l in md if l.startswith('| `layer_weights`'))
    assert '| 1 per layer | (0.03, 0.03, 0.03) |' in line and '| SCFS only |' in line
    assert next(l for l in md if l.startswith('| `freeze_last_layer`')).startswith('| `freeze_last_layer` | 1 | whole run | 1 |')


def _settings(m):
    "Modules, their plain attributes and every parameter's sum: what distinguishes two models."
    plain = lambda v: v.tolist() if hasattr(v, 'tolist') else repr(v)
    mods = [(n, type(x).__name__, {k: plain(v) for k, v in vars(x).items() if not k.startswith('_') and k != 'training'})
            for n, x in m.named_modules()]
    return mods + [(n, tuple(p.shape), p.sum().item()) for n, p in m.named_parameters()]


def test_the_arm_is_the_arm_the_models_carry():
    "Switching an objective row's setting to the official value changes the DINO form's model iff the row says 'both arms'."
    rows = {r['setting']: r for r in departures() if r['kind'] == 'objective'}
    build = lambda method, **ch: (torch.manual_seed(0), _settings(build_model(replace(get_config('tiny', method=method), **ch))))[1]
    ref = {m: build(m) for m in ('dino', 'scfs')}
    with_warmup = {'warmup_teacher_temp': dict(warmup_teacher_temp_epochs=50)}   # a warm-up's start shows only with a warm-up
    checked = 0
    for k, r in rows.items():
        if k not in ('centering', 'koleo_weight', 'head_bn', 'warmup_teacher_temp', 'teacher_temp', 'loc_weight',
                     'layer_weights', 'layer_init'): continue                    # the others live outside the model
        ch = {k: r['official'], **with_warmup.get(k, {})}
        assert build('scfs', **ch) != ref['scfs'], k
        assert (build('dino', **ch) != ref['dino']) == (r['arm'] == BOTH), k
        checked += 1
    assert checked == 8

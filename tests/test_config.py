"""Every setting of `Config` refused in one line before anything is written (issue 24): a table with a bad value for
every field, run through `scfs pretrain` (exit 2, one line naming the field, no run folder); a guard that fails when a
new field has no row; and a seeded fuzz test of random bad values over all fields."""
import contextlib, io, math, random, string
from dataclasses import fields
from pathlib import Path
import pytest

from scfs.cli import main
from scfs.config import Config, get_config
from scfs.core import ScfsError
from scfs.data import generate_scenes
from scfs.loader import check_data

# Bad values as the command line writes them (`key=value`), per field; the first plain string is the field's row of
# the table test, the fuzz test draws from all (a callable draws a value from a `random.Random`). {tmp} is a folder
# with `empty/` (no images) and `file.txt` in it. The rows are written from what each setting means, not copied from
# the validator's tables, so that a rule missing there makes a row fail.
neg = lambda lo=0: lambda r: str(r.randint(-10 ** 6, lo - 1))                # an integer below `lo`
below = lambda lo=0.0: lambda r: f'{lo - r.uniform(1e-3, 1e3):.4g}'           # a float below `lo`
prob = lambda r: r.choice([f'{1 + r.uniform(1e-3, 10):.4g}', f'{-r.uniform(1e-3, 10):.4g}', 'nan'])
word = lambda r: ''.join(r.choice(string.ascii_lowercase) for _ in range(r.randint(1, 8))) + '_x'
notbool = ['maybe', '2', 'yes please', word]
BAD = {
    'preset': ['huge', word], 'data': ['{tmp}/missing', '{tmp}/empty', ''], 'generate': notbool,
    'scenes_train': ['0', neg(1)], 'scenes_test': ['-1', neg(0), '1.5'], 'scenes_size': ['8', lambda r: str(r.randint(-99, 15))],
    'scenes_clutter': ['extreme', word], 'subset': ['-1', neg(0), 'all'],
    'knn_train': ['{tmp}/missing', '', '{tmp}/empty'], 'knn_val': ['', ' '],
    'method': ['byol', word], 'backbone': ['vit_b_16', word],
    'backbone_kw': ['{"widths": [16, 32, 0, 128]}', '[1, 2]', '{"depth": 3}', '{"widths": [16, -32, 64, 128]}'],
    'out_dim': ['0', neg(1)], 'head_hidden': ['0', neg(1)], 'head_bottleneck': ['0', neg(1)], 'head_bn': notbool,
    'norm_last_layer': notbool, 'layer_out_dim': ['0', neg(1)], 'layer_bottleneck': ['0', '-4', '1.5', word],
    'layer_init': ['xavier', word], 'search_layers': ['()', 'layer1', 'layer2,layer2', 'layer5', '[]'],
    'layer_weights': ['-1,0.03,0.03', '0.1,0.1', 'nan,1,1', lambda r: f'0.03,{-r.uniform(1e-3, 9):.3g},0.03'],
    'search_softmax': notbool, 'search_keys': ['all', word],
    'global_size': ['0', neg(1)], 'local_size': ['0', neg(1)], 'n_local': ['-1', neg(0)],
    'global_scale': ['0.2,1.5', '0,1', '0.9,0.5', '0.5', 'nan,1'], 'local_scale': ['0.5,0.1', '0.1,2', '-0.1,0.4'],
    'photometric': notbool,
    'jitter': ['0.4,0.4,0.4,0.6', '-0.1,0.4,0.4,0.1', '0.4,0.4,0.4', '1.5,0.4,0.4,0.1',
               lambda r: f'0.4,0.4,0.4,{0.5 + r.uniform(1e-3, 5):.3g}'],
    'p_jitter': ['1.5', prob], 'p_grey': ['1.5', prob], 'p_shuffle': ['-0.5', prob], 'p_invert': ['2', prob],
    'blur_sigma': ['0,0', '2,1', '-1,2', '0.1', 'nan,2'], 'loader': ['disk', word], 'memory_size': ['0', neg(1)],
    'epochs': ['0', neg(1), '2.5'], 'batch_size': ['1', '0', neg(1), '100'], 'batch_size_per_gpu': ['-1', '1', neg(0)],
    'optimizer': ['lamb', word], 'lr': ['-1', '0', 'nan', 'inf', below()], 'min_lr': ['-1', below()],
    'momentum': ['1.5', prob], 'weight_decay': ['-1', below(), 'inf'], 'weight_decay_end': ['-1', below()],
    'warmup_epochs': ['-2', neg(0), '1.5'], 'clip_grad': ['-1', below(), 'nan'], 'freeze_last_layer': ['-1', neg(0)],
    'momentum_teacher': ['1.5', prob], 'warmup_teacher_temp': ['0', below()], 'teacher_temp': ['0', below(), 'nan'],
    'warmup_teacher_temp_epochs': ['-1', neg(0)], 'student_temp': ['-0.1', '0', below()],
    'center_momentum': ['-0.1', prob], 'centering': ['mean', word], 'koleo_weight': ['-0.1', below()],
    'loc_weight': ['-1', below()], 'loc_layers': ['()', 'layer1', 'layer9', 'layer3,layer3'], 'loc_temp': ['0', below()],
    'out': ['{tmp}/file.txt', ''], 'seed': ['-1', '4294967296', neg(0), 'x'], 'device': ['tpu', 'cuda:x', 'gpu', word],
    'amp': ['fp8', word], 'channels_last': notbool, 'sync_bn': notbool, 'workers': ['-1', neg(0)], 'threads': ['-1', neg(0)],
    'deterministic': notbool, 'save_every': ['-1', neg(0)], 'save_every_iters': ['-1', neg(0)], 'max_iters': ['-1', neg(0)],
    'eval': notbool, 'eval_random': notbool, 'eval_size': ['0', neg(1)], 'knn_k': ['0', neg(1)],
    'knn_T': ['0', below(), 'nan'], 'monitor_every': ['-1', neg(0)], 'monitor_n': ['1', neg(2)], 'progress': notbool,
    'tensorboard': notbool, 'resume': notbool, 'force': notbool,
}
# Python values of the wrong type for a field's annotation (what a script or a config.json could pass)
WRONG_TYPE = {'int': [True, 1.5, [1], None, 'x'], 'float': [True, [1.0], None, float('nan'), float('-inf'), 'x'],
              'bool': [1, 0, 'x', None, [True]], 'str': [3, True, ['a'], None], 'tuple': [3, True, 2.5],
              'dict': [[], 3, 'x'], 'str | None': [3, True, ['a']], 'int | None': [True, 'x', [1]],
              'tuple | None': [3, True], 'bool | None': [1, 'x']}
FIELDS = [f.name for f in fields(Config)]
TYPES = {f.name: str(f.type) for f in fields(Config)}
# what the base command sets, by field: a row for that field leaves the flag out
FLAGS = {'data': ['--data', '{data}'], 'out': ['--out', '{tmp}/run'], 'epochs': ['--epochs', '1'], 'eval': ['--no-eval'],
         'progress': ['--quiet'], 'max_iters': ['max_iters=1']}


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
    return generate_scenes(tmp_path_factory.mktemp('scenes') / 's', n_train=64, n_test=20, size=32, workers=1)


@pytest.fixture
def tmp(tmp_path):
    (tmp_path / 'empty').mkdir(); (tmp_path / 'file.txt').write_text('not a run folder')
    return tmp_path


def _text(v, r):
    return v(r) if callable(v) else v


def _row(field):
    return next(v for v in BAD[field] if isinstance(v, str))


def _pretrain(field, value, tmp, scenes):
    "Run `scfs pretrain` in-process on the tiny scenes with `field=value` (base: one step, no kNN, quiet) -> (rc, stderr)."
    fill = lambda s: s.replace('{tmp}', str(tmp)).replace('{data}', str(scenes))
    argv = ['pretrain'] + [fill(a) for k, a_s in FLAGS.items() if k != field for a in a_s] + [f'{field}={fill(value)}']
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try: rc = main(argv)
        except SystemExit as e: rc = e.code
    return rc, err.getvalue().strip()


def _nothing_written(tmp):
    assert sorted(p.name for p in tmp.iterdir()) == ['empty', 'file.txt'] and not any((tmp / 'empty').iterdir())
    assert (tmp / 'file.txt').read_text() == 'not a run folder'


def test_every_field_has_a_row():
    "A new Config field must get a bad value here (and so a rule in validate_config or check_data)."
    missing, stale = set(FIELDS) - set(BAD), set(BAD) - set(FIELDS)
    assert not missing and not stale, f'no row for {sorted(missing)}; rows for fields that are gone: {sorted(stale)}'
    assert set(WRONG_TYPE) >= set(TYPES.values()), set(TYPES.values()) - set(WRONG_TYPE)


@pytest.mark.parametrize('field', FIELDS)
def test_bad_value_of_every_field_exit_2_one_line_nothing_written(field, tmp, scenes):
    rc, err = _pretrain(field, _row(field), tmp, scenes)
    assert rc == 2 and err.startswith('scfs pretrain: error:') and '\n' not in err, (field, rc, err[-500:])
    name = 'batch_size' if field == 'batch_size_per_gpu' else field
    assert name in err.split('error:', 1)[1], (field, err)
    _nothing_written(tmp)


def _refusal(ov: dict, tmp, scenes):
    "The ScfsError message for the settings `ov` (on top of the base run), from get_config then check_data; None if accepted."
    base = dict(data=str(scenes), out=str(tmp / 'run'), epochs='1', eval='false', progress='false', max_iters='1')
    ov = {**base, **{k: v.replace('{tmp}', str(tmp)) if isinstance(v, str) else v for k, v in ov.items()}}
    preset = ov.pop('preset', 'tiny')
    try: check_data(get_config(preset, **ov))
    except ScfsError as e: return str(e)


def test_fuzz_random_bad_values_refused_in_one_line(tmp, scenes):
    "Seeded random bad values over all fields (one field, a wrong Python type, or several at once): 300 draws."
    r, n = random.Random(24), 0
    for i in range(300):
        kind = ('value', 'type', 'several')[i % 3]
        if kind == 'type':
            k = r.choice(FIELDS); ov = {k: r.choice(WRONG_TYPE[TYPES[k]])}
        else:
            ks = r.sample(FIELDS, 1 if kind == 'value' else r.randint(2, 4))
            ov = {k: _text(r.choice(BAD[k]), r) for k in ks}
        msg = _refusal(ov, tmp, scenes)
        assert msg is not None, f'accepted: {ov}'
        named = [k for k in ov if k in msg or (k == 'batch_size_per_gpu' and 'batch_size' in msg)]
        assert named and '\n' not in msg, (ov, msg)
        n += 1
    assert n == 300
    _nothing_written(tmp)


def test_fuzz_through_the_command_line(tmp, scenes):
    "A few random draws through `scfs pretrain` itself: exit 2, one line, nothing written."
    r = random.Random(2024)
    for k in r.sample(FIELDS, 6):
        v = _text(r.choice(BAD[k]), r)
        rc, err = _pretrain(k, v, tmp, scenes)
        assert rc == 2 and '\n' not in err and err.startswith('scfs pretrain: error:'), (k, v, err[-300:])
        _nothing_written(tmp)


def test_rows_are_bad_only_in_their_field(tmp, scenes):
    "The base settings of the tests are accepted: each refusal above comes from the bad value, not from the base."
    assert _refusal({}, tmp, scenes) is None
    good = {'lr': '0.02', 'batch_size': '32', 'jitter': '0.4,0.4,0.4,0.5', 'search_layers': 'layer4', 'layer_weights': '0.5'}
    assert _refusal(good, tmp, scenes) is None

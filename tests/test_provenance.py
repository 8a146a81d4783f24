"Tests for provenance: a stored run is held to the recipe it is filed under, and runs without provenance stay archived."
import json
from dataclasses import asdict
from pathlib import Path
import pytest
from scfs.config import get_config
from scfs.core import ScfsError
from scfs.experiments import _locked_update, load_results
from scfs import recipes as R

RESULTS = Path(__file__).resolve().parent.parent / 'nbs' / 'results'


def made_up(name='tiny-official', seed=0, preset='tiny-official', overrides=None, bench='shapes', gain=20.0, **ran):
    "A recipe run as `run_recipe` stores it (config as config.json stores it), `ran` changing settings; no training."
    cfg = asdict(get_config(preset, **(overrides or {}), data=R.BENCHMARKS[bench], seed=seed, out=f'runs/{name}-s{seed}',
                            eval=False, progress=False, tensorboard=False, force=True, threads=1))
    return dict(name=name, bench=bench, seed=seed, preset=preset, overrides=overrides or {}, val_knn=15.0 + gain,
                random_val_knn=15.0, gain=gain, minutes=5.0, source_hash='0123456789abcdef',
                config=json.loads(json.dumps(dict(cfg, **ran), default=str)))


def refusal(runs):
    with pytest.raises(ScfsError) as e: R.check_provenance(runs, 'recipes.json')
    return str(e.value)


def test_a_matching_run_passes_and_runtime_fields_are_ignored():
    runs = [made_up(seed=s) for s in (0, 1)] + [made_up('room-x', 0, 'tiny-official', dict(R.ROOM, epochs=9, method='dino'))]
    assert R.check_provenance(runs) == runs
    assert R.check_provenance([made_up(threads=2, device='cpu', out='elsewhere', eval=True, progress=True)])


def test_a_mismatched_run_is_refused_naming_the_run_and_the_first_differing_field():
    assert refusal([made_up(), made_up(seed=1, lr=0.02, epochs=3)]) == (
        "recipes.json: run 'tiny-official' [shapes] seed 1 does not match the recipe it is filed under: "
        "it ran with epochs=3, the recipe gives 25")                    # epochs comes before lr in Config
    assert 'ran with preset=' in refusal([made_up(preset='tiny')])       # filed as tiny-official, ran tiny
    assert 'ran with method=' in refusal([made_up('tiny-dino', preset='tiny')])   # tiny-dino means method=dino
    assert "ran with data='data/digit-scenes'" in refusal([made_up(data='data/digit-scenes')])   # filed under the shapes
    assert 'row mixes recipes (epochs=14 here, 12 in its other seeds)' in \
        refusal([made_up('room-x', s, overrides=dict(epochs=e)) for s, e in ((0, 12), (1, 14))])
    assert 'no provenance' in refusal([dict(made_up(), source_hash=None)])


def test_recorded_runs_are_held_to_their_preset_and_changes():
    rec = dict(name='scfs pretrain', preset='tiny', changed=dict(epochs=3), source_hash='ab',
               config=json.loads(json.dumps(asdict(get_config('tiny', epochs=3)), default=str)))
    assert R.check_provenance([rec])
    assert 'ran with epochs=3, the recipe gives 25' in refusal([dict(rec, changed={})])


def test_readme_results_refuses_a_mismatched_row_and_renders_a_matching_one(tmp_path):
    assert R.readme_results(tmp_path).count('| *no stored runs yet* |') == 6          # no file at all: every table says so
    good = [made_up(n, s, p, ov, gain=g + s) for n, p, ov, g in (('tiny-official', 'tiny-official', None, 20.0),
            ('tiny-official-dino', 'tiny-official', dict(method='dino'), 18.0)) for s in (0, 1, 2)]
    _locked_update(tmp_path / 'recipes.json', lambda d: d['runs'].extend(good))
    md = R.readme_results(tmp_path)
    assert '| tiny-official | `tiny-official-dino` | `tiny-official` | 3 | +19.0 ± 2.5 (3) | +21.0 ± 2.5 (3) | +2.0 ± 0.0 |' in md
    _locked_update(tmp_path / 'recipes.json', lambda d: d['runs'].append(made_up(seed=3, layer_weights=[0.03] * 3)))
    with pytest.raises(ScfsError, match=r"run 'tiny-official' \[shapes\] seed 3 .* it ran with layer_weights=\[0.03, 0.03, 0.03\], "
                                        r"the recipe gives None"):
        R.readme_results(tmp_path)


def test_readme_results_checks_the_room_screen_too(tmp_path):
    ov = dict(R.ROOM, epochs=12, method='dino')
    _locked_update(tmp_path / 'room_screen.json', lambda d: d['runs'].append(made_up('screen-x', 0, 'tiny-official', ov)))
    assert '| screen-x | `tiny-official`, global_size=64' in R.readme_results(tmp_path)
    _locked_update(tmp_path / 'room_screen.json', lambda d: d['runs'].append(made_up('screen-y', 0, 'tiny-official', ov, epochs=3)))
    with pytest.raises(ScfsError, match=r"room_screen.json: run 'screen-y' \[shapes\] seed 0 .* it ran with epochs=3"):
        R.readme_results(tmp_path)


def test_archive_moves_runs_without_provenance_unchanged(tmp_path):
    p, old = tmp_path / 'r.json', [dict(name='old', seed=0, gain=1.5), dict(name='old', seed=1, config={'seed': 1})]
    _locked_update(p, lambda d: d['runs'].extend([old[0], made_up(), old[1]]))
    assert R.archive_unprovenanced(p) == 2 and R.archive_unprovenanced(p) == 0
    assert [r['name'] for r in load_results(p)] == ['tiny-official']
    assert load_results(tmp_path / 'archive' / 'pre-provenance-r.json') == old


def test_every_stored_run_has_provenance_and_the_archive_none():
    assert all(R.has_provenance(r) for f in RESULTS.glob('*.json') for r in load_results(f))
    archived = [r for f in (RESULTS / 'archive').glob('pre-provenance-*.json') for r in load_results(f)]
    assert archived and not any(R.has_provenance(r) for r in archived)


def _source_commit():
    import importlib.util, subprocess
    root = RESULTS.parent.parent
    try: shallow = subprocess.run(['git', '-C', str(root), 'rev-parse', '--is-shallow-repository'], capture_output=True, text=True)
    except OSError: pytest.skip('git is not installed')
    if shallow.returncode or shallow.stdout.strip() != 'false': pytest.skip('not a full git clone: the history is needed')
    spec = importlib.util.spec_from_file_location('source_commit', root / '.ci' / 'source_commit.py')
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    return m, root


def test_source_commit_recomputes_source_hash_from_git(monkeypatch):
    import subprocess
    from scfs.core import source_hash
    m, root = _source_commit()
    monkeypatch.chdir(root)
    if subprocess.run(['git', 'diff', '--quiet', 'HEAD', '--', 'scfs/']).returncode or \
            subprocess.run(['git', 'ls-files', '--others', '--exclude-standard', 'scfs/'], capture_output=True, text=True).stdout:
        pytest.skip('scfs/ differs from HEAD: nothing to compare with')
    assert m.commit_hash('HEAD') == source_hash(root / 'scfs')
    assert m.commits_of(['0123456789abcdef']) == {'0123456789abcdef': []}      # a hash of no commit finds none


def test_every_stored_run_traces_to_a_commit(monkeypatch):
    "Every source_hash in nbs/results/*.json and data/backbones/*.json is the scfs/ sources of a commit on main."
    m, root = _source_commit()
    monkeypatch.chdir(root)
    counts = m.result_hashes()
    assert counts, 'no stored run with a source_hash'
    lost = {h: n for h, cs in m.commits_of(counts).items() if not cs for n in [counts[h]]}
    assert not lost, f'stored runs whose sources match no commit (started on uncommitted code): {lost}'

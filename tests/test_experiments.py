"Tests for scfs.experiments: resumable study runner, summaries, paired differences, verdict, CSV."
import json
from pathlib import Path
import pytest
from scfs import experiments as ex


def _runner(calls, fail=()):
    def run(name, overrides, seed, **kw):
        calls.append((name, seed))
        if name in fail: raise RuntimeError('boom')
        return dict(name=name, seed=seed, knn=50.0 + seed + overrides.get('bonus', 0), linear=60.0 + seed,
                    epoch_time=1.0, loss=[2.0, 1.0])
    return run


def test_run_study_saves_incrementally_and_resumes(tmp_path):
    rp, calls = tmp_path / 'r.json', []
    cfgs = {'dino': {}, 'scfs': {'bonus': 1}, 'bad': {}}
    res = ex.run_study(cfgs, [0, 1], results_path=rp, base={}, out_root=tmp_path, runner=_runner(calls, {'bad'}), log=lambda *a: None)
    assert calls == [('dino', 0), ('scfs', 0), ('bad', 0), ('dino', 1), ('scfs', 1), ('bad', 1)]
    saved = json.loads(rp.read_text())['runs']
    assert len(saved) == len(res) == 6 and sum('error' in r for r in saved) == 2
    calls.clear()
    ex.run_study(cfgs, [0, 1], results_path=rp, base={}, out_root=tmp_path, runner=_runner(calls), log=lambda *a: None)
    assert calls == [('bad', 0), ('bad', 1)]           # finished pairs are not rerun, failed ones are retried
    assert not any('error' in r for r in ex.load_results(rp))


def test_summarise_and_paired_difference():
    res = [dict(name='dino', seed=s, knn=50.0 + s, linear=60.0, epoch_time=1.0) for s in range(3)]
    res += [dict(name='scfs', seed=s, knn=52.0 + 2 * s, linear=59.0, epoch_time=1.5) for s in range(3)]
    res += [dict(name='scfs', seed=3, error='x')]
    rows = {r['name']: r for r in ex.summarise(res)}
    assert rows['scfs']['n'] == 3 and rows['scfs']['knn_mean'] == pytest.approx(54.0) and rows['scfs']['knn_std'] == pytest.approx(2.0)
    d = ex.paired_difference(res, 'scfs', 'dino', 'knn')
    assert d['diffs'] == [2.0, 3.0, 4.0] and d['mean'] == pytest.approx(3.0) and d['std'] == pytest.approx(1.0) and d['wins'] == 3
    v = ex.verdict(res)
    assert 'kNN (k=20): SCFS is better than DINO (+3.00' in v and 'linear probe: SCFS is worse than DINO (-1.00' in v


def test_verdict_noise_is_not_a_win():
    res = [dict(name='dino', seed=s, knn=50.0, linear=50.0) for s in range(3)]
    res += [dict(name='scfs', seed=s, knn=50.0 + d, linear=50.0 + d) for s, d in enumerate((1.0, -1.0, 0.5))]
    assert ex.verdict(res).count('not distinguishable') == 2


def test_plan_orders_main_pairs_first():
    jobs = ex._ordered_jobs(ex.study_plan(quick=False))
    # seed by seed, the (DINO, SCFS) pair of every clutter level, then the ablations
    assert jobs[:6] == [('dino', 0), ('scfs', 0), ('dino@medium', 0), ('scfs@medium', 0), ('dino@high', 0), ('scfs@high', 0)]
    assert jobs[6:8] == [('dino', 1), ('scfs', 1)] and len(jobs) == 18 + len(ex.ABLATIONS)
    assert {n for n, _ in jobs[18:]} == set(ex.ABLATIONS)
    # two shards: one runs every DINO job, the other the matching SCFS job, so pairs finish together
    assert all(a[0].replace('dino', 'scfs') == b[0] and a[1] == b[1] for a, b in zip(jobs[0:18:2], jobs[1:18:2]))
    q = ex.study_plan(quick=True, root='/tmp/x')
    assert q['results_path'].startswith('/tmp/x') and q['base']['epochs'] == 1


def test_write_csv(tmp_path):
    p = tmp_path / 's.csv'
    ex.write_csv([dict(name='a', knn_mean=1.23456), dict(name='b', linear_mean=2.0)], p)
    lines = p.read_text().splitlines()
    assert lines[0] == 'name,knn_mean,linear_mean' and lines[1] == 'a,1.2346,' and lines[2] == 'b,,2.0000'


def test_step_curves_from_metrics(tmp_path):
    recs = [dict(type='step', epoch=0, step=i, loss=3.0 - i, dino=2.0, lr=0.1, **{'layer4/local': 1.0 + i}) for i in range(3)]
    recs.append(dict(type='epoch', epoch=0, loss=2.0, dino=2.0))
    (tmp_path / 'metrics.jsonl').write_text('\n'.join(json.dumps(r) for r in recs) + '\n')
    c = ex._step_curves(tmp_path)
    assert c['loss'] == [3.0, 2.0, 1.0] and c['layer4/local'] == [1.0, 2.0, 3.0] and 'lr' not in c
    res = [dict(name='scfs', seed=0, run_dir=str(tmp_path)), dict(name='x', seed=0, run_dir=str(tmp_path / 'gone'))]
    assert ex.attach_step_curves(res) == 1 and res[0]['dino_steps'] == [2.0] * 3 and 'loss_steps' not in res[1]
    assert ex._history_curve([dict(epoch=0, loss=2.0), dict(epoch=1, loss=1.0), dict(epoch=1, loss=3.0)]) == [2.0, 2.0]


def test_merge_shards_keeps_job_order_and_both_shards(tmp_path):
    plan = ex.study_plan(quick=True, root=str(tmp_path))
    jobs = ex._ordered_jobs(plan)
    for i in range(2):
        runs = [dict(name=n, seed=s, knn=float(k)) for k, (n, s) in enumerate(jobs) if k % 2 == i]
        ex.save_results(runs, ex._shard_path(plan['results_path'], (i, 2)), dict(started=f's{i}', finished=f'f{i}'))
    merged = ex.merge_shards(plan)
    assert [(r['name'], r['seed']) for r in merged] == jobs and [r['knn'] for r in merged] == list(range(len(jobs)))
    meta = json.loads(Path(plan['results_path']).read_text())['meta']
    assert [m['started'] for m in meta['shards']] == ['s0', 's1']

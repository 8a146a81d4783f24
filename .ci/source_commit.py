"""Which commits' `scfs/` sources have a given `source_hash` (the hash every stored run carries)?

usage: python .ci/source_commit.py HASH [HASH ...]     (from the repository root; needs the git history)
       python .ci/source_commit.py --results            (every hash in nbs/results/*.json, with its commits)

The hash is `scfs.core.source_hash`: sha256 over every `scfs/*.py`, sorted by name, of name + NUL + content + NUL,
first 16 hex digits. Here it is recomputed from each commit's tree with git, so a number in the README can be traced
to the code that produced it (a run started on uncommitted sources has no commit: it prints none)."""
import glob, hashlib, json, subprocess, sys


def git(*a) -> bytes: return subprocess.run(['git', *a], check=True, capture_output=True).stdout


def commit_hash(commit: str) -> str:
    "source_hash of the `scfs/*.py` files at `commit`."
    names = sorted(l.split('\t')[1] for l in git('ls-tree', commit, 'scfs/').decode().splitlines()
                   if l.endswith('.py') and l.split('\t')[1].count('/') == 1)
    h = hashlib.sha256()
    for n in names: h.update(n.split('/')[1].encode() + b'\0' + git('show', f'{commit}:{n}') + b'\0')
    return h.hexdigest()[:16]


def commits_of(hashes) -> dict:
    "{hash: [short commits whose scfs/ hash it is, newest first]}."
    out = {h: [] for h in hashes}
    for c in git('log', '--format=%h', '--', 'scfs/').decode().split():
        h = commit_hash(c)
        if h in out: out[h].append(c)
    return out


def result_hashes() -> dict:
    "{source_hash: number of stored runs} over nbs/results/*.json (archive excluded) and the shipped backbones' JSON."
    n = {}
    runs = [r for p in sorted(glob.glob('nbs/results/*.json')) for r in json.load(open(p)).get('runs', [])]
    for r in runs + [json.load(open(p)) for p in sorted(glob.glob('data/backbones/*.json'))]:
        if r.get('source_hash'): n[r['source_hash']] = n.get(r['source_hash'], 0) + 1
    return n


if __name__ == '__main__':
    args = sys.argv[1:]
    if not args: sys.exit(__doc__)
    counts = result_hashes() if args == ['--results'] else {h: None for h in args}
    for h, cs in commits_of(counts).items():
        runs = '' if counts[h] is None else f' ({counts[h]} stored runs and backbones)'
        print(f"{h}{runs}: {', '.join(cs[:3]) + (' ...' if len(cs) > 3 else '') if cs else 'no commit'}")

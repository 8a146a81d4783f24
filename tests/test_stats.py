"Tests for the statistics of scfs.experiments: Student's t quantile for any df, ci95, and verdicts from intervals."
import math
import pytest
from scfs.experiments import t_quantile, t_cdf, betainc, t_interval, ci95, interval_side, compare, verdict

# t_{0.975, df} from published tables (3 decimals)
REFERENCE = {1: 12.706, 2: 4.303, 5: 2.571, 11: 2.201, 16: 2.120, 30: 2.042, 100: 1.984, 1000: 1.962}


@pytest.mark.parametrize('df,t', sorted(REFERENCE.items()))
def test_t_quantile_matches_published_values(df, t):
    assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-3)


def test_t_quantile_closed_forms_symmetry_and_inverse():
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)              # Cauchy
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)  # df 2 in closed form
        assert t_quantile(1 - p, 7) == pytest.approx(-t_quantile(p, 7), rel=1e-12)
    assert t_quantile(0.5, 3) == 0.0
    for df in (1.5, 2.5, 11, 40.5):                       # any df, not only integers: the CDF inverts the quantile
        assert t_cdf(t_quantile(0.9875, df), df) == pytest.approx(0.9875, abs=1e-12)
    assert t_quantile(0.975, 2) < t_quantile(0.975, 1.5) and t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)
    with pytest.raises(ValueError): t_quantile(1.0, 3)
    with pytest.raises(ValueError): t_quantile(0.975, 0)


def test_betainc_against_the_binomial_sum():
    # I_x(a, n - a + 1) = P(Binomial(n, x) >= a)
    for a, n, x in ((2, 4, 0.4), (1, 1, 0.3), (5, 9, 0.7), (3, 20, 0.05)):
        want = sum(math.comb(n, j) * x ** j * (1 - x) ** (n - j) for j in range(a, n + 1))
        assert betainc(a, n - a + 1, x) == pytest.approx(want, rel=1e-10)


def test_ci95_hand_computed():
    # [1, 2, 3, 6]: mean 3, s = sqrt(14/3) = 2.16025, t_{0.975,3} = 3.18245: half-width 3.18245 * 2.16025 / 2 = 3.43745
    m, h, n = ci95([1.0, 2.0, 3.0, 6.0])
    assert (m, n) == (3.0, 4) and h == pytest.approx(3.43745, abs=1e-4)
    # two values: s / sqrt(2) = |a - b| / 2, so the half-width is t_{0.975,1} * 1 = 12.706
    assert ci95([10.0, 12.0])[1] == pytest.approx(12.706, abs=1e-3)
    # 12 values (df 11): 2.201, not the narrower 2.18 a table fallback gave
    xs = [float(i % 2) for i in range(12)]
    assert ci95(xs)[1] == pytest.approx(2.201 * 0.522233 / math.sqrt(12), abs=1e-3)
    assert ci95([5.0]) == (5.0, None, 1) and ci95([]) == (None, None, 0) and ci95([None, 2.0, None]) == (2.0, None, 1)
    assert t_interval([1.0, 2.0, 3.0, 6.0], 0.99)[1] == pytest.approx(5.84091 * 2.16025 / 2, abs=1e-4)


def test_interval_side_and_the_multiplicity_rule():
    assert [interval_side(*x) for x in ((2.0, 1.0), (-2.0, 1.0), (0.5, 1.0), (1.0, None))] == \
        ['above 0', 'below 0', 'includes 0', 'no interval']
    d = [2.0, 3.0, 4.0]                            # 95 %: [+0.52, +5.48]; 97.5 %: [-0.58, +6.58]
    c = compare({'main': d, 'other': d, 'third': d}, primary='main')
    assert c['main']['level'] == 0.95 and c['main']['side'] == 'above 0' and c['main']['role'] == 'primary'
    assert c['other']['level'] == pytest.approx(0.975) and c['other']['side'] == 'includes 0'
    assert c['other']['role'] == 'secondary, Bonferroni over 2' and c['other']['h95'] == pytest.approx(c['main']['h'])
    fam = compare({'a': d, 'b': d, 'c': [1.0]})    # no primary: every comparison read shares the correction ('c' is not read)
    assert fam['a']['level'] == pytest.approx(0.975) and fam['c']['side'] == 'no interval'
    assert compare({'a': d})['a']['side'] == 'above 0' and compare({'a': d})['a']['role'] == 'one comparison read'


def test_verdict_calls_a_difference_from_its_interval():
    dino = [dict(name='dino', seed=s, knn=50.0, linear=50.0) for s in range(3)]
    # SCFS ahead on every seed and mean (1.0) > std (0.87), yet the 95 % interval includes 0: not a difference
    close = dino + [dict(name='scfs', seed=s, knn=50.0 + x, linear=50.0 + x) for s, x in enumerate((2.0, 0.5, 0.5))]
    assert 'kNN (k=20): SCFS and DINO are not distinguishable (+1.00 points, 95 % interval [-1.15, +3.15]' in verdict(close)
    clear = dino + [dict(name='scfs', seed=s, knn=50.0 + x, linear=50.0 - x) for s, x in enumerate((2.0, 3.0, 4.0))]
    v = verdict(clear)
    assert 'kNN (k=20): SCFS is better than DINO (+3.00 points, 95 % interval [+0.52, +5.48]' in v and '; primary)' in v
    assert 'linear probe: SCFS is worse than DINO (-3.00' in v and '; secondary)' in v

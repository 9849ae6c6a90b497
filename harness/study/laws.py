"""Parametric scaling laws of FID: three families, the ways of fitting them, bootstrap intervals and
identification checks. harness.study.forecast chooses among them by held-out error.

Families (inputs are normalised by their geometric mean over the fitted runs, C0, N0, T0):
  power        FID = A * (C/C0)^-alpha                     C: compute (Gflops or training compute)
  saturating   FID = E + A * (C/C0)^-alpha
  two-factor   FID = E + A * (N/N0)^-alpha + B * (T/T0)^-beta   N: parameters, T: tokens per image
A fitting choice is a family plus the space it is fitted in (FID or log FID), the loss (squares or
Huber) and, for families with an offset E, whether E may be negative ("free") or not ("nonneg").
Every fit starts from several points and keeps the lowest cost.

Parameter intervals: a bootstrap whose unit is a group (a model); a sweep with several seeds per
model resamples models, then seeds inside each model.

Prediction interval of a new run (`Fit.interval`, needs `fit(..., loo=True)`), in log FID:
    log FID_hat(x) +- t_{n-k}((1+level)/2) * s * sqrt(1 + v(x))
s^2: the mean squared leave-one-group-out error in log FID (each model predicted by the law fitted to
the others: noise plus the misfit the law shows inside the data); v(x) = g(x)' (J'J + s^2 I)^-1 g(x), the
target's leverage (g, J: gradients of log FID in the parameters at x and at the fitted rows; it
grows with extrapolation and with weakly determined parameters); t: Student's with n - k degrees of
freedom. It is the textbook nonlinear-regression prediction interval with the in-sample residual
scale replaced by the out-of-sample one, so that misfit of the law's form widens it, and a prior of
sd 1 on each normalised parameter (J'J + s^2 I), so that a parameter the rows do not determine widens
it too.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

from harness.errors import HarnessError

SPACES = ("fid", "log")
LOSSES = ("squares", "huber")
EXPONENT_MAX = 5.0
SPAN_MAX = 100.0       # a positive parameter whose interval spans more than this factor is not identified
OFFSET_MIN = -10.0     # a free offset may go down to -10 x the median FID (a runaway ends on this bound)
_BOUND_TOL = 1e-5
LEVEL = 0.9            # the prediction intervals' level, fixed in advance (harness.study.forecast)
MIN_DOF = 3            # residual degrees of freedom a law must leave to be fitted


@dataclass(frozen=True)
class Law:
    """A family: its inputs (columns of X), parameter names and kinds (offset | scale | exponent)."""

    name: str
    inputs: tuple[str, ...]
    params: tuple[str, ...]
    kinds: tuple[str, ...]
    formula: str

    def value(self, p: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Law in normalised units: p (k,), z (n, len(inputs)) -> FID / scale (n,)."""
        if self.name == "power":
            return p[0] * z[:, 0] ** -p[1]
        if self.name == "saturating":
            return p[0] + p[1] * z[:, 0] ** -p[2]
        return p[0] + p[1] * z[:, 0] ** -p[2] + p[3] * z[:, 1] ** -p[4]

    def jacobian(self, p: np.ndarray, z: np.ndarray) -> np.ndarray:
        """d value / d p: p (k,), z (n, len(inputs)) -> (n, k). For a term s * x^-e: d/ds = x^-e,
        d/de = -s * x^-e * ln x; an offset's derivative is 1."""
        cols = []
        if self.name != "power":
            cols.append(np.ones(len(z)))
        terms = [(0, p[0], p[1])] if self.name == "power" else [(0, p[1], p[2])]
        if self.name == "two-factor":
            terms.append((1, p[3], p[4]))
        for j, s, e in terms:
            xe = z[:, j] ** -e
            cols += [xe, -s * xe * np.log(z[:, j])]
        return np.column_stack(cols)


LAWS = {
    "power": Law("power", ("compute",), ("A", "alpha"), ("scale", "exponent"), "FID = A·(C/C0)^-alpha"),
    "saturating": Law("saturating", ("compute",), ("E", "A", "alpha"), ("offset", "scale", "exponent"),
                      "FID = E + A·(C/C0)^-alpha"),
    "two-factor": Law("two-factor", ("params", "tokens"), ("E", "A", "alpha", "B", "beta"),
                      ("offset", "scale", "exponent", "scale", "exponent"),
                      "FID = E + A·(N/N0)^-alpha + B·(T/T0)^-beta"),
}


@dataclass(frozen=True)
class Choice:
    """One candidate: a family and how it is fitted."""

    law: str
    space: str = "fid"       # "fid" | "log"
    loss: str = "squares"    # "squares" | "huber"
    offset: str = "none"     # "none" (no offset) | "free" | "nonneg"
    exponent: str = "falls"  # "falls": each exponent in [0, EXPONENT_MAX] | "free": either sign, unbounded
                             # (the report's descriptive power law, which must not presume that FID falls)

    @property
    def label(self) -> str:
        parts = [self.law, "log FID" if self.space == "log" else "FID", self.loss]
        if self.offset != "none":
            parts.append("E free" if self.offset == "free" else "E >= 0")
        if self.exponent == "free":
            parts.append("exponent free")
        return " | ".join(parts)


def choices(laws: tuple[str, ...] = tuple(LAWS)) -> list[Choice]:
    """Every candidate: each family x space x loss (x offset free / nonneg where it has one)."""
    out = []
    for name in laws:
        offsets = ("free", "nonneg") if "offset" in LAWS[name].kinds else ("none",)
        for space, loss, off in itertools.product(SPACES, LOSSES, offsets):
            out.append(Choice(name, space, loss, off))
    return out


@dataclass
class Fit:
    """A fitted choice. theta is in normalised units; `params` gives them in FID units."""

    choice: Choice
    theta: np.ndarray
    x0: np.ndarray          # (len(inputs),) normalisers
    scale: float            # FID normaliser (median FID of the fitted runs)
    resid: np.ndarray       # training residuals in the fitting space
    at_bound: list[str]     # parameters that ended on a bound
    n: int
    boot: np.ndarray | None = field(default=None, repr=False)   # (B, k) bootstrap thetas
    z: np.ndarray | None = field(default=None, repr=False)      # (n, inputs) normalised fitted inputs
    loo: np.ndarray | None = field(default=None, repr=False)    # leave-one-group-out log errors (pred/actual)

    @property
    def law(self) -> Law:
        return LAWS[self.choice.law]

    def _z(self, X: dict) -> np.ndarray:
        return np.column_stack([np.asarray(X[k], float) for k in self.law.inputs]) / self.x0

    def predict(self, X: dict, theta: np.ndarray | None = None) -> np.ndarray:
        """FID at inputs X ({input name: array (m,)}) -> (m,)."""
        return self.scale * self.law.value(self.theta if theta is None else theta, self._z(X))

    def params(self, theta: np.ndarray | None = None) -> dict[str, float]:
        """Parameters in FID units (offset and scales x the FID normaliser; exponents as they are)."""
        t = self.theta if theta is None else theta
        return {n: float(v * self.scale if k != "exponent" else v) for n, v, k in zip(self.law.params, t, self.law.kinds)}

    def boot_params(self) -> np.ndarray:
        """(B, k) bootstrap parameters in FID units."""
        mult = np.array([self.scale if k != "exponent" else 1.0 for k in self.law.kinds])
        return self.boot * mult if self.boot is not None and self.boot.size else np.empty((0, len(mult)))

    def leverage(self, X: dict, s: float) -> np.ndarray:
        """v(x) = g' (J'J + s^2 I)^-1 g of each target (m,), with gradients of log FID in the parameters
        and s the residual scale: a Gaussian prior of sd 1 on each normalised parameter, so that a
        direction the rows do not determine counts as uncertain, not as known (a pseudo-inverse would
        drop it)."""
        g = log_gradient(self.law, self.theta, self._z(X))
        J = log_gradient(self.law, self.theta, self.z)
        return np.einsum("mk,kl,ml->m", g, np.linalg.inv(J.T @ J + s ** 2 * np.eye(len(self.theta))), g)

    def interval(self, X: dict, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """The prediction interval of a new run at X (module docstring); NaN without leave-one-out
        errors or without a residual degree of freedom."""
        m = len(next(iter(X.values())))
        dof = self.n - len(self.theta)
        ok = self.loo[np.isfinite(self.loo)] if self.loo is not None else np.empty(0)
        if dof < 1 or len(ok) < 2 or self.z is None:
            return np.full(m, np.nan), np.full(m, np.nan)
        s = float(np.sqrt(np.mean(ok ** 2)))
        half = stats.t.ppf((1 + level) / 2, dof) * s * np.sqrt(1 + self.leverage(X, s))
        pred = self.predict(X)
        return pred * np.exp(-half), pred * np.exp(half)

    def param_intervals(self, level: float = 0.9) -> dict[str, tuple[float, float]]:
        bp = self.boot_params()
        if len(bp) < 10:
            return {n: (float("nan"), float("nan")) for n in self.law.params}
        q = [(1 - level) / 2, (1 + level) / 2]
        return {n: tuple(float(v) for v in np.quantile(bp[:, j], q)) for j, n in enumerate(self.law.params)}

    def identification(self, y: np.ndarray, level: float = 0.9) -> dict[str, str | None]:
        """Per parameter: None when identified, else why not (a bound hit, an interval spanning
        orders of magnitude, an offset interval wider than the observed FIDs, no bootstrap)."""
        cis = self.param_intervals(level)
        span = float(np.ptp(y)) if len(y) else float("nan")
        out: dict[str, str | None] = {}
        for name, kind in zip(self.law.params, self.law.kinds):
            lo, hi = cis[name]
            if name in self.at_bound:
                out[name] = f"{name} ended on a bound of the fit ({self.params()[name]:.3g})"
            elif not (np.isfinite(lo) and np.isfinite(hi)):
                out[name] = "no bootstrap interval (too few runs)"
            elif kind == "offset" and self.choice.offset == "nonneg" and lo <= 1e-6 * self.scale:
                out[name] = f"its {level:.0%} interval reaches the bound 0 (upper end {hi:.3g})"
            elif kind == "offset" and hi - lo > span:
                out[name] = f"its {level:.0%} interval [{lo:.3g}, {hi:.3g}] is wider than the observed FID range ({span:.3g})"
            elif kind != "offset" and (lo <= 0 or hi / lo > SPAN_MAX):
                out[name] = f"its {level:.0%} interval [{lo:.3g}, {hi:.3g}] spans orders of magnitude"
            else:
                out[name] = None
        return out


def _bounds(choice: Choice) -> tuple[list[float], list[float]]:
    lo, hi = [], []
    for kind in LAWS[choice.law].kinds:
        if kind == "offset":
            lo.append(OFFSET_MIN if choice.offset == "free" else 0.0)
            hi.append(np.inf)
        elif kind == "scale":
            lo.append(0.0), hi.append(np.inf)
        elif choice.exponent == "free":
            lo.append(-np.inf), hi.append(np.inf)
        else:
            lo.append(0.0), hi.append(EXPONENT_MAX)
    return lo, hi


def _starts(law: Law, offset: str, ymin: float) -> list[np.ndarray]:
    """Starting points in normalised units (FID / median): a small grid over offset and exponents."""
    offsets = [0.0] if offset == "none" else ([0.0, 0.5 * ymin] if offset == "nonneg" else [-0.5, 0.0, 0.5 * ymin])
    exps = [0.3, 1.0]
    out = []
    for e0 in offsets:
        rest = 1.0 - e0
        if law.name == "power":
            out += [np.array([1.0, a]) for a in exps]
        elif law.name == "saturating":
            out += [np.array([e0, rest, a]) for a in exps]
        else:
            out += [np.array([e0, rest / 2, a, rest / 2, b]) for a in exps for b in exps]
    return out


def _residual_fn(law: Law, space: str, z: np.ndarray, yn: np.ndarray):
    if space == "log":
        ly = np.log(yn)
        return lambda p: np.log(np.clip(law.value(p, z), 1e-9, None)) - ly
    return lambda p: law.value(p, z) - yn


def _residual_jac(law: Law, space: str, z: np.ndarray):
    """The analytic Jacobian of `_residual_fn` (n, k); in log space d log v = dv / v (0 where the
    value is clipped: the clip is flat there)."""
    if space == "log":
        return lambda p: log_gradient(law, p, z)
    return lambda p: law.jacobian(p, z)


def _solve(fun, starts, lo, hi, loss: str, f_scale: float, jac="2-point"):
    best = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x0 in starts:
            x0 = np.clip(x0, np.array(lo) + 1e-9, np.array(hi) - 1e-9)
            try:
                res = optimize.least_squares(fun, x0, jac=jac, bounds=(lo, hi), loss=loss, f_scale=f_scale,
                                             x_scale="jac", max_nfev=300)
            except (ValueError, np.linalg.LinAlgError):
                continue
            if np.all(np.isfinite(res.x)) and (best is None or res.cost < best.cost):
                best = res
    return best


def _fit_theta(choice: Choice, z: np.ndarray, yn: np.ndarray, starts: list[np.ndarray]) -> np.ndarray | None:
    """Least squares (then Huber from there, its scale 1.345 x the robust spread of the squares
    residuals) from each start; the best theta or None."""
    law = LAWS[choice.law]
    lo, hi = _bounds(choice)
    fun, jac = _residual_fn(law, choice.space, z, yn), _residual_jac(law, choice.space, z)
    best = _solve(fun, starts, lo, hi, "linear", 1.0, jac)
    if best is None:
        return None
    if choice.loss == "huber":
        r = fun(best.x)
        mad = 1.4826 * float(np.median(np.abs(r - np.median(r))))
        if mad > 0:
            hub = _solve(fun, [best.x], lo, hi, "huber", 1.345 * mad, jac)
            best = hub if hub is not None else best
    return best.x


def log_gradient(law: Law, p: np.ndarray, z: np.ndarray) -> np.ndarray:
    """d log(value) / d p (n, k); 0 where the value is not positive."""
    v = law.value(p, z)
    return np.where((v > 1e-9)[:, None], law.jacobian(p, z) / np.maximum(v, 1e-9)[:, None], 0.0)


def _needed(law: Law) -> int:
    return len(law.params) + 1


def fit(choice: Choice, X: dict, y, groups=None, n_boot: int = 0, seed: int = 0, loo: bool = False) -> Fit:
    """Fit one choice to FIDs y (n,) at inputs X ({input: (n,)}); `groups` (n,) is the bootstrap and
    leave-one-out unit (default: each point its own); `loo` computes the leave-one-group-out errors
    that `Fit.interval` needs. HarnessError when the points cannot determine the law."""
    law = LAWS[choice.law]
    y = np.asarray(y, float)
    cols = [np.asarray(X[k], float) for k in law.inputs]
    if len(y) < _needed(law) or any(np.any(~np.isfinite(c) | (c <= 0)) for c in cols) or np.any(y <= 0):
        raise HarnessError(f"a {law.name} law needs >= {_needed(law)} runs with positive "
                           f"{', '.join(law.inputs)} and FID; got {len(y)}")
    if any(len(np.unique(c)) < 2 for c in cols):
        raise HarnessError(f"a {law.name} law needs >= 2 distinct values of each of {', '.join(law.inputs)}")
    x0 = np.array([float(np.exp(np.mean(np.log(c)))) for c in cols])
    scale = float(np.median(y))
    z, yn = np.column_stack(cols) / x0, y / scale
    theta = _fit_theta(choice, z, yn, _starts(law, choice.offset, float(yn.min())))
    if theta is None:
        raise HarnessError(f"the {choice.label} fit did not converge from any start")
    lo, hi = _bounds(choice)
    at_bound = [n for n, v, a, b in zip(law.params, theta, lo, hi)
                if (np.isfinite(a) and abs(v - a) <= _BOUND_TOL * (1 + abs(a)))
                or (np.isfinite(b) and abs(v - b) <= _BOUND_TOL * (1 + abs(b)))]
    resid = _residual_fn(law, choice.space, z, yn)(theta)
    out = Fit(choice, theta, x0, scale, resid, at_bound, len(y), z=z)
    if loo:
        out.loo = loo_errors(choice, X, y, groups)
    if n_boot:
        bootstrap(out, X, y, groups, n_boot, seed)
    return out


def loo_errors(choice: Choice, X: dict, y, groups=None) -> np.ndarray:
    """log(predicted / actual) of each row, its group left out of the fit (NaN where that fit fails)."""
    y = np.asarray(y, float)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    out = np.full(len(y), np.nan)
    for g in dict.fromkeys(groups.tolist()):
        test = groups == g
        try:
            f = fit(choice, {k: np.asarray(v, float)[~test] for k, v in X.items()}, y[~test])
        except HarnessError:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            out[test] = np.log(f.predict({k: np.asarray(v, float)[test] for k, v in X.items()}) / y[test])
    return out


def bootstrap(f: Fit, X: dict, y, groups=None, n_boot: int = 200, seed: int = 0) -> Fit:
    """Refit `f`'s choice on `n_boot` resamples (see `resample`) of the points it was fitted to, each
    from f's estimate; sets f.boot (B, k). Fewer than 3 groups: no bootstrap (an empty f.boot)."""
    z = f._z(X)
    yn = np.asarray(y, float) / f.scale
    f.boot = _bootstrap_thetas(f.choice, z, yn, f.theta, groups, n_boot, seed)
    return f


def resample(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a two-level bootstrap resample: groups with replacement, then members (e.g. the
    seeds of a model) with replacement inside each drawn group."""
    keys = list(dict.fromkeys(groups.tolist()))
    members = [np.flatnonzero(groups == k) for k in keys]
    picks = rng.integers(0, len(keys), len(keys))
    return np.concatenate([rng.choice(members[i], len(members[i])) for i in picks])


def _bootstrap_thetas(choice: Choice, z, yn, theta, groups, n_boot: int, seed: int) -> np.ndarray:
    law = LAWS[choice.law]
    groups = np.arange(len(yn)) if groups is None else np.asarray(groups)
    if len(set(groups.tolist())) < 3:
        return np.empty((0, len(theta)))
    rng = np.random.default_rng(seed)
    starts = [theta]
    out, seen = [], {}   # a fit depends only on the multiset of points drawn: few runs repeat many multisets
    for _ in range(n_boot):
        sel = np.sort(resample(groups, rng))
        if any(len(np.unique(z[sel, j])) < 2 for j in range(z.shape[1])) or len(np.unique(sel)) < _needed(law) - 1:
            continue
        key = sel.tobytes()
        if key not in seen:
            seen[key] = _fit_theta(choice, z[sel], yn[sel], starts)
        if seen[key] is not None:
            out.append(seen[key])
    return np.array(out) if out else np.empty((0, len(theta)))

# ----------------------------------------------------------------------------------- the report's power law
POWER_LOGLOG = Choice("power", "log", "squares", exponent="free")   # least squares of log y on log C


@dataclass
class PowerLawFit:
    """y = a * C^b in the data's own units: the power law fitted in log space by least squares with
    the exponent free in sign (POWER_LOGLOG); `boot` (B, 2) holds a, b of each bootstrap refit, and
    the intervals are its quantiles at `level`."""

    a: float
    b: float
    a_ci: tuple[float, float]
    b_ci: tuple[float, float]
    n: int
    level: float
    r2: float
    boot: np.ndarray = field(repr=False)  # (B, 2): a, b per bootstrap resample

    form = "power law: y = a * C^b"

    def predict(self, c) -> np.ndarray:
        return self.a * np.asarray(c, float) ** self.b

    def interval(self, c) -> tuple[np.ndarray, np.ndarray]:
        c = np.atleast_1d(np.asarray(c, float))
        if self.boot.size == 0:
            return np.full(c.shape, np.nan), np.full(c.shape, np.nan)
        preds = self.boot[:, :1] * c[None, :] ** self.boot[:, 1:2]
        return (np.quantile(preds, (1 - self.level) / 2, axis=0), np.quantile(preds, (1 + self.level) / 2, axis=0))

    def with_boot(self, boot: np.ndarray) -> PowerLawFit:
        """This fit with the bootstrap `boot` (B, 2) and the intervals it gives."""
        self.boot = boot
        self.a_ci, self.b_ci = _quantiles(boot[:, 0], self.level), _quantiles(boot[:, 1], self.level)
        return self


def _quantiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    if samples.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def power_ab(f: Fit, theta: np.ndarray | None = None) -> tuple[float, float]:
    """A power-law fit's (a, b) of y = a * C^b in the data's units: FID = scale * A * (C/C0)^-alpha."""
    t = f.theta if theta is None else theta
    return float(f.scale * t[0] * f.x0[0] ** t[1]), float(-t[1])


def _positive_points(c, y, groups=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The points (c, y) with both finite and positive (the fit runs in log space), and their groups."""
    c, y = np.asarray(c, float), np.asarray(y, float)
    ok = np.isfinite(c) & np.isfinite(y) & (c > 0) & (y > 0)
    return c[ok], y[ok], None if groups is None else np.asarray(groups)[ok]


def power_law(c, y, groups=None, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> PowerLawFit:
    """Fit y = a * C^b to the positive points; `groups` (e.g. run ids, one per point) is the bootstrap
    unit (see `resample`)."""
    c, y, groups = _positive_points(c, y, groups)
    if len(c) < 3 or len(np.unique(c)) < 2:
        raise HarnessError(f"a power-law fit needs >= 3 points at >= 2 compute values; got {len(c)}")
    f = fit(POWER_LOGLOG, {"compute": c}, y, groups, n_boot=n_boot, seed=seed)
    a, b = power_ab(f)
    ly = np.log(y)
    r2 = 1 - f.resid.var() / ly.var() if ly.var() > 0 else float("nan")
    out = PowerLawFit(a, b, (np.nan, np.nan), (np.nan, np.nan), len(c), level, float(r2), np.empty((0, 2)))
    boot = f.boot if f.boot is not None else np.empty((0, 2))
    return out.with_boot(np.array([power_ab(f, t) for t in boot]).reshape(-1, 2))


def finite_json(obj):
    """A result dict with non-finite floats as null (strict JSON)."""
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_json(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj

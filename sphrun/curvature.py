"""Second-order measures of the train loss over the scale-invariant parameters (docs/science.md, What is measured).

The loss measured is the train loss L = sum_b w_b L_b over the full mini-batches b of the fixed
permutation that train metrics use (w_b = |b| / images measured, equal weights since batches are full;
the n mod batch_size leftover images are dropped, as training drops them), so every matrix is a
weighted sum over batches:

    hessian-trace  tr H,  H = d^2 L / d theta^2                 Hutchinson, Rademacher probes in theta space
    hessian-eig    the largest (algebraic) eigenvalue of H      Lanczos with full reorthogonalization
    hessian-density  the density of H's eigenvalues             stochastic Lanczos quadrature, Rademacher starts
    fisher-trace   tr F,  F = sum_b w_b J_b^T Q_b J_b           Hutchinson, Rademacher probes in output space

J_b is the Jacobian of the batch's logits with respect to theta and Q_b the Hessian of the batch loss
with respect to the logits, so F is the Gauss-Newton matrix, which is the Fisher for these losses:
per image Q = diag(p) - p p^T for cross-entropy (p the softmax), 2/C I for mse (mean over C classes),
divided by the batch size. Traces are totals over all SI parameters, not per parameter. With BatchNorm
in train mode an image's logits depend on its whole batch, which J_b and Q_b take into account.

Probes are drawn per batch: tr H = sum_b w_b tr H_b is estimated with fresh probes in every batch, so
the batches' errors are independent and average out (with one probe shared by all batches they would
add up, batch Hessians being alike), at the same cost. They are drawn on the device from counters
(sphrun.noise), so a measure makes no host sync per batch.

The density (Ghorbani, Krishnan and Xiao 2019, "An investigation into neural net optimization via
Hessian eigenvalue density"; PyHessian's `density`): Lanczos from a probe z gives the Gauss quadrature
of the spectral measure of H seen from z / |z|, sum_i (q_i . z)^2 / |z|^2 delta(lambda - lambda_i): its
nodes are the Ritz values and its weights the squared first components of the eigenvectors of the
tridiagonal matrix. For a Rademacher z the measure's mean is the eigenvalue density (1/n) sum_i
delta(lambda - lambda_i), so the mean over probes of the quadratures, each node widened into a Gaussian,
estimates it. The width is the quadrature's resolution, the median gap between neighbouring Ritz values
(docs/science.md: a smooth bulk, sharp outliers), or a fraction `sigma` of their spread; either way the
curve's shape does not depend on the loss's scale.

On CUDA the measures run in full float32 (TF32 off) unless asked: TF32's 10-bit mantissa is noise in
Hessian-vector products and Lanczos.
"""

import csv
import json
import math
import os
from typing import NamedTuple

import torch

from sphrun import SphrunError, __version__, noise
from sphrun.files import CannotWrite, format_value, remove_temporaries, write_text
from sphrun.lifecycle import RunState, data_difference, data_identity, read_settings, restore
from sphrun.metrics import batch_loss, full_batches, preserved_bn_state, tf32, train_metrics
from sphrun.progress import StepProgress, message
from sphrun.rundir import RunDir
from sphrun.stopping import Interrupted, StopNow, StopRequest, by_signal, stopping_at_once

MEASURES = ("gm", "fisher-trace", "hessian-trace", "hessian-eig", "hessian-density")
DEFAULT_MEASURES = MEASURES[:4]  # the density costs 50 times hessian-eig at the defaults: asked for by name
CURVES = ("hessian-density",)  # measures whose value is a curve, kept in RUN/<measure>.csv, not curvature.csv
SCALARS = tuple(m for m in MEASURES if m not in CURVES)
DENSITY_COLUMNS = ("iter", "eigenvalue", "density")
# Gaussian widths sampled around each Ritz value: beyond, a node's Gaussian is under 2e-11 of its peak, so
# the mass outside and the trapezoid's straight line over a gap between two stretches are under 1e-9
DENSITY_PAD = 7
SAMPLES_PER_WIDTH = 5  # grid points per Gaussian width: the trapezoid integral is then exact to 1e-9
# --sigma's range, a fraction of the spread: its floor (also that of the width tied to the Ritz values' gaps)
# bounds the even grid the curve's rows are taken from to 5e5 points
SIGMA_RANGE = (1e-5, 1.0)
# Lanczos steps by measure: hessian-eig's are the paper's; the density's are PyHessian's default, so that
# both compute one quadrature (docs/science.md, The Hessian's eigenvalue density).
LANCZOS_STEPS = {"hessian-eig": 10, "hessian-density": 100}


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector, like):
    """A flat vector cut into tensors shaped like the list `like`."""
    return [v.view_as(p) for v, p in zip(vector.split([p.numel() for p in like]), like)]


class Probes:
    """Rademacher probes: probe(k, like), the k-th probe of a batch, is a vector of independent +-1
    shaped, typed and placed like `like`, drawn on its device (sphrun.noise) from (seed, step, measure,
    draw), so a checkpoint's value depends neither on the other checkpoints or measures computed with it
    nor on the device, and drawing costs no host sync and no copy. (k is for sources like an explicit
    basis; each draw here is new.)"""

    def __init__(self, seed, it, measure):
        self.base = noise.key(seed, noise.PROBE, it, MEASURES.index(measure))
        self.drawn = 0
        self.elements = {}  # element keys by length, computed once

    def __call__(self, k, like):
        count = like.numel()
        if count not in self.elements:
            self.elements[count] = noise.element_keys(count, like.device)
        signs = noise.rademacher(self.elements[count], noise.key_at(self.base, self.drawn))
        self.drawn += 1
        return signs.to(like.dtype).view_as(like)


def batch_weights(batches):
    total = sum(len(idx) for idx in batches)
    return [len(idx) / total for idx in batches]


def hessian_trace(model, params, x, y, loss, batches, probes, probe, advance=lambda: None):
    """Hutchinson's tr H: mean over `probes` probes z of sum_b w_b z^T H_b z, one forward per batch."""
    total = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
    for idx, weight in zip(batches, batch_weights(batches)):
        grads = torch.autograd.grad(batch_loss(model(x[idx]), y[idx], loss), params, create_graph=True)
        grad = flat(grads)
        for k in range(probes):
            z = probe(k, grad)
            hz = torch.autograd.grad(grad @ z, params, retain_graph=True)
            total += weight * (flat(hz) @ z).detach()
            advance()
    return total.item() / probes


def fisher_trace(model, params, x, y, loss, batches, probes, probe, advance=lambda: None):
    """Hutchinson's tr F: mean over probes u of sum_b w_b ||J_b^T S_b u||^2 with S_b S_b^T = Q_b, so
    E_u = sum_b w_b tr(J_b^T Q_b J_b); u lives in the batch's logit space, one backward per probe."""
    total = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
    for idx, weight in zip(batches, batch_weights(batches)):
        logits = model(x[idx])
        for k in range(probes):
            u = probe(k, logits.detach().reshape(-1)).view_as(logits)
            g = torch.autograd.grad(logits, params, grad_outputs=output_hessian_sqrt(logits.detach(), loss, u),
                                    retain_graph=True)
            total += weight * torch.stack([(t * t).sum() for t in g]).sum()
            advance()
    return total.item() / probes


def output_hessian_sqrt(logits, loss, u):
    """S u, where S S^T is the Hessian of the mean batch loss with respect to the logits (B, C).

    ce: per image diag(p) - p p^T = S S^T with S = diag(sqrt p) - p sqrt(p)^T (since sum p = 1);
    mse (mean over classes): 2/C I. Both divided by the batch size B for the mean over the batch.
    """
    batch, classes = logits.shape
    if loss == "ce":
        p = torch.softmax(logits, dim=1)
        root = p.sqrt()
        return (root * u - p * (root * u).sum(1, keepdim=True)) / batch ** 0.5
    return u * (2 / (classes * batch)) ** 0.5


def hessian_vector_product(model, params, x, y, loss, batches, vector, advance=lambda: None):
    """H v for the flat vector v, H the Hessian of sum_b w_b L_b."""
    v = unflat(vector, params)
    out = torch.zeros_like(vector)
    for idx, weight in zip(batches, batch_weights(batches)):
        grads = torch.autograd.grad(batch_loss(model(x[idx]), y[idx], loss), params, create_graph=True)
        out += weight * flat(torch.autograd.grad(grads, params, grad_outputs=v))
        advance()
    return out


def lanczos_tridiagonal(matvec, start, steps):
    """The tridiagonal matrix (float64, at most steps x steps) of `steps` Lanczos steps from `start`.

    Full reorthogonalization (twice, which is enough) keeps the basis orthogonal in floating point, so
    no ghost copies appear; the tridiagonal matrix is built in float64. Stops early when the Krylov space
    is invariant (then its eigenvalues are exact).
    """
    basis = start[None] / torch.linalg.vector_norm(start)
    alphas, betas = [], []
    for _ in range(steps):
        w = matvec(basis[-1])
        alphas.append((w @ basis[-1]).item())
        if len(alphas) == steps:
            break
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        beta = torch.linalg.vector_norm(w).item()
        if beta <= 100 * torch.finfo(w.dtype).eps * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        basis = torch.cat([basis, (w / beta)[None]])
    off = torch.tensor(betas, dtype=torch.float64)
    return torch.diag(torch.tensor(alphas, dtype=torch.float64)) + torch.diag(off, 1) + torch.diag(off, -1)


def lanczos_top_eigenvalue(matvec, start, steps):
    """The largest eigenvalue of the Ritz matrix after `steps` Lanczos steps from `start`: it approaches
    the matrix's largest eigenvalue from below."""
    return torch.linalg.eigvalsh(lanczos_tridiagonal(matvec, start, steps)).max().item()


def ritz_spectrum(matvec, start, steps):
    """(Ritz values, weights), float64: the eigenvalues of the Lanczos tridiagonal matrix and the squared
    first components of its eigenvectors, the Gauss quadrature of the spectral measure seen from
    start / |start| (Golub and Meurant). The weights sum to 1."""
    values, vectors = torch.linalg.eigh(lanczos_tridiagonal(matvec, start, steps))
    return values, vectors[0] ** 2


class Density(NamedTuple):
    """A spectral density sampled on a grid: eigenvalues (ascending) and the density at each, floats."""
    eigenvalues: list
    density: list


def smoothed_density(spectra, sigma=None):
    """The mean over probes of their quadratures [(Ritz values, weights)], each node a Gaussian, sampled
    around the nodes: a density in 1 / (eigenvalue unit) that integrates to 1. Its standard deviation is
    sigma * (the spread of all Ritz values) or, with sigma None, the quadrature's resolution (resolution)."""
    values = torch.cat([v for v, _ in spectra])
    weights = torch.cat([w for _, w in spectra]) / len(spectra)
    low, high = values.min().item(), values.max().item()
    spread = (high - low) or abs(high) or 1.0  # one node alone: widen it relative to its size
    width = sigma * spread if sigma is not None else max(resolution(spectra), SIGMA_RANGE[0] * spread)
    grid = density_grid(values, low, high, width)
    z = (grid[:, None] - values[None]) / width
    density = (weights * torch.exp(-z ** 2 / 2)).sum(1) / (width * math.sqrt(2 * math.pi))
    return Density(grid.tolist(), density.tolist())


def resolution(spectra):
    """The median gap between neighbouring Ritz values of one probe, pooled over the probes: where the
    quadrature's nodes are (the bulk), no finer feature is resolved, and Gaussians of that width merge
    into a smooth curve (equal ones spaced one width apart ripple by 2 exp(-2 pi^2), 5e-9), while
    isolated converged Ritz values (outliers) stay sharp. 0 without a gap."""
    gaps = torch.cat([v.diff() for v, _ in spectra])
    return gaps.median().item() if len(gaps) else 0.0


def density_grid(values, low, high, width):
    """The even grid a fifth of `width` apart from DENSITY_PAD widths below the lowest Ritz value to as far
    above the highest, less its points farther than DENSITY_PAD widths from every Ritz value: a narrow
    width over a wide spread keeps few rows."""
    points = math.ceil((high - low + 2 * DENSITY_PAD * width) / width * SAMPLES_PER_WIDTH) + 1
    grid = torch.linspace(low - DENSITY_PAD * width, high + DENSITY_PAD * width, points, dtype=torch.float64)
    step = (grid[-1] - grid[0]).item() / (points - 1)
    nearest = ((values - grid[0]) / step).round().long()  # each node's grid point
    reach = DENSITY_PAD * SAMPLES_PER_WIDTH + 1
    kept = torch.zeros(points + 1, dtype=torch.int64)  # +1 where a node's stretch begins, -1 past its end
    kept.index_add_(0, (nearest - reach).clamp(0, points), torch.ones_like(nearest))
    kept.index_add_(0, (nearest + reach + 1).clamp(0, points), -torch.ones_like(nearest))
    return grid[kept.cumsum(0)[:-1] > 0]


def describe(value):
    """A measured value in a line: a number, or the range and size of a density's grid."""
    if isinstance(value, Density):
        return (f"density over eigenvalues {value.eigenvalues[0]:.4g} to {value.eigenvalues[-1]:.4g} "
                f"({len(value.eigenvalues)} points)")
    return f"{value:.9g}"


def measure(model, params, x, y, loss, order, batch_size, measures, probes=5, lanczos=None, bn_mode="train",
            seed=0, it=0, advance=lambda: None, sigma=None, probe_done=lambda k: None):
    """{measure: value} at the model's current weights over the full batches of `order` (full_batches);
    hessian-density's value is a Density (`probes` Lanczos runs of `lanczos` steps, smoothed by `sigma`,
    None: at the quadrature's resolution). `lanczos` None: each measure's LANCZOS_STEPS.
    advance() follows each batch pass, probe_done(k) the density's k-th Lanczos run.

    BatchNorm buffers and mode are left as found. gm is the mean mini-batch gradient norm in BN train
    mode, as in metrics.csv, whatever `bn_mode`.
    """
    batches = full_batches(order, batch_size)
    probes_for = lambda name: Probes(seed, it, name)
    values = {}
    with preserved_bn_state(model):
        if "gm" in measures:
            values["gm"] = train_metrics(model, params, x, y, loss, batch_size, order)[2]
            for _ in batches:
                advance()
        model.train(bn_mode == "train")
        if "fisher-trace" in measures:
            values["fisher-trace"] = fisher_trace(model, params, x, y, loss, batches, probes,
                                                  probes_for("fisher-trace"), advance)
        if "hessian-trace" in measures:
            values["hessian-trace"] = hessian_trace(model, params, x, y, loss, batches, probes,
                                                    probes_for("hessian-trace"), advance)
        matvec = lambda v: hessian_vector_product(model, params, x, y, loss, batches, v, advance)
        like = flat([p.detach() for p in params]) if {"hessian-eig", "hessian-density"} & set(measures) else None
        if "hessian-eig" in measures:
            values["hessian-eig"] = lanczos_top_eigenvalue(matvec, probes_for("hessian-eig")(0, like),
                                                           lanczos_steps("hessian-eig", lanczos))
        if "hessian-density" in measures:
            start = probes_for("hessian-density")
            spectra = []
            for k in range(probes):
                spectra.append(ritz_spectrum(matvec, start(k, like), lanczos_steps("hessian-density", lanczos)))
                probe_done(k + 1)
            values["hessian-density"] = smoothed_density(spectra, sigma)
            note_spikes(spectra, sigma, it)
    return values


def note_spikes(spectra, sigma, it):
    """A note when a --sigma narrower than half the quadrature's resolution draws the Ritz values as
    separate peaks, not a density."""
    values = torch.cat([v for v, _ in spectra])
    spread = (values.max() - values.min()).item()
    if sigma is not None and sigma * spread < resolution(spectra) / 2:
        message(f"note: at step {it} --sigma {sigma:g} is under half the gap between neighbouring Ritz values "
                f"({resolution(spectra) / spread:.2g} of the spread): the curve shows them as separate peaks; "
                f"leave --sigma out to smooth at that resolution, or give more --lanczos steps")


def lanczos_steps(measure, lanczos):
    """The Lanczos steps of `measure`: `lanczos`, or None for the measure's own default."""
    return LANCZOS_STEPS[measure] if lanczos is None else lanczos


def cost_units(measures, num_batches, probes, lanczos):
    """Batch passes that `measure` makes (the progress bar's unit)."""
    per = {"gm": 1, "fisher-trace": probes, "hessian-trace": probes,
           "hessian-eig": lanczos_steps("hessian-eig", lanczos),
           "hessian-density": probes * lanczos_steps("hessian-density", lanczos)}
    return num_batches * sum(per[m] for m in measures)


# --- RUN/curvature.csv ------------------------------------------------------------------------------

def parse_measures(text):
    """'gm,hessian-eig' -> ('gm', 'hessian-eig'), in the canonical column order."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MEASURES]
    if unknown or not names:
        raise SphrunError(f"unknown measure {', '.join(unknown) or repr(text)}: choose from {','.join(MEASURES)}")
    return tuple(m for m in MEASURES if m in names)


def parse_at(text):
    """'all' -> 'all'; 'last' or '100,200' -> ['last'] or [100, 200]."""
    if text.strip() == "all":
        return "all"
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or any(t != "last" and not t.isdigit() for t in items):
        raise SphrunError(f"--at must be all, last or step numbers like 100,200, got {text!r}")
    return [t if t == "last" else int(t) for t in items]


# The options each measure's value depends on: values of other options never mix in one column. Besides
# these, "data": the fingerprint of the data measured on, when it is not the run's own (--other-data).
# "generator": the probes' (sphrun.noise.GENERATOR), which an earlier sphrun's differ from.
DEPENDS_ON = {"gm": ("batches", "tf32"),
              "fisher-trace": ("batches", "probes", "bn_mode", "seed", "generator", "tf32"),
              "hessian-trace": ("batches", "probes", "bn_mode", "seed", "generator", "tf32"),
              "hessian-eig": ("batches", "lanczos", "bn_mode", "seed", "generator", "tf32"),
              "hessian-density": ("batches", "probes", "lanczos", "sigma", "bn_mode", "seed", "generator", "tf32")}


class CurvatureFile:
    """RUN/curvature.csv (iter plus one column per scalar measure, empty where not measured), beside it
    RUN/hessian-density.csv (iter, eigenvalue, density: one curve per step) and RUN/curvature.json, the
    options each measure was measured with. Several processes may measure one run: each value is merged
    into the files as they are then, under a lock held for the write only."""

    def __init__(self, run):
        self.run = run
        self.csv_path = os.path.join(run.path, "curvature.csv")
        self.json_path = os.path.join(run.path, "curvature.json")
        self.density_path = os.path.join(run.path, "hessian-density.csv")

    def has(self, it, measure, options):
        """Whether step `it` has `measure` measured with `options` (by another process, perhaps)."""
        rows, stored = self.read()
        return measure in rows.get(it, {}) and stored.get(measure) == options

    def add(self, it, measure, value, options, replace):
        """Merge one value, measured with `options`, into the files as they are now. A column of `measure`
        measured with other options meanwhile is replaced when `replace` (--recompute), else refused."""
        with self.run.lock(".curvature.lock", wait=True):
            remove_temporaries(self.run.path, ("curvature.csv", "curvature.json", "hessian-density.csv"))
            rows, stored = self.read()
            if any(measure in values for values in rows.values()) and stored.get(measure) != options:
                if not replace:
                    raise SphrunError(f"{self.path_of(measure)} got {measure} measured with other options by "
                                      f"another process meanwhile: the value ({describe(value)}) at step {it} "
                                      f"was not written; pass --recompute to replace that column")
                for values in rows.values():
                    values.pop(measure, None)
            rows.setdefault(it, {})[measure] = value
            self.write(rows, {**stored, measure: options})

    def path_of(self, measure):
        return self.density_path if measure in CURVES else self.csv_path

    def read(self):
        """({iter: {measure: value}}, {measure: options}); a density's value is a Density."""
        options = {}
        if os.path.exists(self.json_path):
            try:
                with open(self.json_path) as f:
                    options = json.load(f)["options"]
            except (OSError, ValueError, KeyError, TypeError):
                options = None
            if not isinstance(options, dict):
                raise SphrunError(f"{self.json_path} is unreadable; delete it and curvature.csv to start over")
        rows = self.read_scalars()
        for it, curve in self.read_densities().items():
            rows.setdefault(it, {})["hessian-density"] = curve
        return rows, options

    def read_scalars(self):
        try:
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                columns = reader.fieldnames or []
                raw = list(reader)
        except FileNotFoundError:
            return {}
        if not columns or columns[0] != "iter" or any(c not in SCALARS for c in columns[1:]):
            raise SphrunError(f"{self.csv_path} is not a sphrun curvature file (columns {columns})")
        try:
            return {int(r["iter"]): {m: float(r[m]) for m in columns[1:] if r[m] not in ("", None)} for r in raw}
        except (TypeError, ValueError):
            raise SphrunError(f"{self.csv_path} has a malformed row; delete it to start over")

    def read_densities(self):
        """{iter: Density} from hessian-density.csv, its rows in the order written (ascending eigenvalue)."""
        try:
            with open(self.density_path, newline="") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                raw = list(reader)
        except FileNotFoundError:
            return {}
        if header is None or tuple(header) != DENSITY_COLUMNS:
            raise SphrunError(f"{self.density_path} is not a sphrun density file (columns {header}, "
                              f"not {','.join(DENSITY_COLUMNS)})")
        curves = {}
        try:
            for it, eigenvalue, density in raw:
                curve = curves.setdefault(int(it), Density([], []))
                curve.eigenvalues.append(float(eigenvalue))
                curve.density.append(float(density))
        except (TypeError, ValueError):
            raise SphrunError(f"{self.density_path} has a malformed row; delete it to start over")
        return curves

    def write(self, rows, options):
        present = [m for m in MEASURES if any(m in values for values in rows.values())]
        scalars = [m for m in present if m in SCALARS]
        record = {"options": {m: options.get(m) for m in present},
                  "versions": {"sphrun": __version__, "torch": torch.__version__}}
        # the options first: a reader never finds a column whose options are not there yet
        write_text(self.json_path, json.dumps(record, indent=2) + "\n")
        if scalars or os.path.exists(self.csv_path):
            lines = [",".join(["iter", *scalars])]
            for it in sorted(rows):
                if any(m in rows[it] for m in scalars):
                    lines.append(",".join([str(it)] + [format_value(rows[it][m]) if m in rows[it] else ""
                                                       for m in scalars]))
            write_text(self.csv_path, "\n".join(lines) + "\n")
        if "hessian-density" in present or os.path.exists(self.density_path):
            lines = [",".join(DENSITY_COLUMNS)]
            for it in sorted(rows):
                curve = rows[it].get("hessian-density")
                if curve:
                    lines += [f"{it},{format_value(e)},{format_value(d)}" for e, d in zip(*curve)]
            write_text(self.density_path, "\n".join(lines) + "\n")


def reconcile(rows, stored, options, measures, recompute, path_of):
    """Drop the columns of `measures` measured with other options when recomputing, refuse otherwise;
    path_of(measure) names the file of its column. Returns the options of every column after this
    invocation."""
    wanted = {m: {k: options[k] for k in (*DEPENDS_ON[m], "data") if k in options} for m in measures}
    for m in set(measures) & set(LANCZOS_STEPS):
        wanted[m]["lanczos"] = lanczos_steps(m, options["lanczos"])  # recorded as a number, never None
    for m in measures:
        path = path_of(m)
        if any(m in values for values in rows.values()) and stored.get(m) != wanted[m]:
            theirs = stored.get(m) or {}
            differing = ", ".join(f"{k} {theirs.get(k)} there, {v} here" for k, v in wanted[m].items()
                                  if theirs.get(k) != v)
            if not recompute and theirs.get("generator") != wanted[m].get("generator"):
                raise SphrunError(f"{path} has {m} measured with the probes of an earlier sphrun, which this "
                                  f"version cannot draw again; pass --recompute to measure that column anew")
            if not recompute:
                raise SphrunError(f"{path} has {m} measured with other options ({differing}); repeat them, "
                                  f"or pass --recompute to replace that column")
            message(f"replacing the {m} column of {path}: it was measured with other options ({differing})")
            for values in rows.values():
                values.pop(m, None)
    return {**stored, **wanted}


def resolve_targets(run, at):
    """[(checkpoint name, step)] for --at, every checkpoint checked to exist first."""
    if at == "all":
        iters = run.checkpoint_iters()
        if not iters:
            raise SphrunError(f"{run} has no checkpoints to measure")
        return [(it, it) for it in iters]
    targets = {}
    for which in at:
        if which == "last":
            it = run.load_checkpoint("last").iter
            targets.setdefault(it, it if run.has_checkpoint(it) else "last")
        else:
            if not run.has_checkpoint(which):
                run.load_checkpoint(which)  # raises, naming the checkpoints there
            targets[which] = which
    return [(which, it) for it, which in sorted(targets.items())]


@stopping_at_once()  # SIGTERM or SIGUSR1 while the data loads stops at once, as in train
def run_curvature(path, at="all", measures=DEFAULT_MEASURES, probes=5, lanczos=None, batches=None,
                  bn_mode="train", recompute=False, seed=0, device="auto", data_dir=None, allow_tf32=False,
                  other_data=False, sigma=None):
    """Measure a run's checkpoints and extend RUN/curvature.csv (RUN/hessian-density.csv for the density);
    returns {step: {measure: value}} measured. `allow_tf32`: TF32 convolutions and matrix products on CUDA
    (default full float32). `other_data`: measure on data other than the run's (its fingerprint then
    becomes one of the columns' options). `lanczos` None: each measure's own steps (LANCZOS_STEPS). `sigma`:
    the density's smoothing, a fraction of its spread, or None: the quadrature's resolution.

    `at` and `measures` take the command line's text ('all', 'last,100'; 'gm,hessian-eig') or parsed values.
    """
    at = parse_at(at) if isinstance(at, str) else at
    measures = parse_measures(measures) if isinstance(measures, str) else tuple(measures)

    given_batches = 1 if batches is None else batches  # None: all of them
    for name, value in (("--probes", probes), ("--lanczos", lanczos), ("--batches", given_batches)):
        if value is not None and value < 1:
            raise SphrunError(f"{name} must be at least 1, got {value}")
    if "hessian-density" in measures and lanczos == 1:
        raise SphrunError("--lanczos 1 gives one Ritz value per probe, Hutchinson's mean eigenvalue: no density; "
                          f"give at least 2 steps (the density's default is {LANCZOS_STEPS['hessian-density']})")
    if bn_mode not in ("train", "eval"):
        raise SphrunError(f"--bn-mode must be train or eval, got {bn_mode!r}")
    if seed < 0:
        raise SphrunError(f"--seed must be 0 or more, got {seed}")
    if sigma is not None and not SIGMA_RANGE[0] <= sigma <= SIGMA_RANGE[1]:
        raise SphrunError(f"--sigma must be between {SIGMA_RANGE[0]:g} and {SIGMA_RANGE[1]:g} (a fraction of "
                          f"the spectrum's spread), got {sigma:g}")
    run = RunDir(path)
    stored, config = read_settings(run)
    if not isinstance(stored.get("train_size"), int):
        raise SphrunError(f"{run.config_path} has no train_size")
    available = stored["train_size"] // config.batch_size  # full batches, as train metrics
    if batches is not None and batches > available:
        raise SphrunError(f"--batches {batches} is more than the {available} train batches of {run}")
    num_batches = available if batches is None else batches
    targets = resolve_targets(run, at)
    store = CurvatureFile(run)
    rows, stored_options = store.read()
    options = {"probes": probes, "lanczos": lanczos, "batches": num_batches, "bn_mode": bn_mode, "seed": seed,
               "generator": noise.GENERATOR, "tf32": allow_tf32, "sigma": "resolution" if sigma is None else sigma}
    restored = None
    if other_data:  # which data is measured on is an option of the columns: load it first
        restored = restore(path, targets[0][0], device, data_dir, other_data=True)
        identity = data_identity(restored[2])
        if data_difference(identity, stored.get("data")):
            options["data"] = identity["fingerprint"]
    column_options = reconcile(rows, stored_options, options, measures, recompute, store.path_of)
    todo = [(which, it, [m for m in measures if recompute or m not in rows.get(it, {})]) for which, it in targets]
    todo = [t for t in todo if t[2]]
    if not todo:
        files = list(dict.fromkeys(store.path_of(m) for m in measures))
        message(f"{' and '.join(files)} already {'has' if len(files) == 1 else 'have'} {','.join(measures)} "
                f"at the steps asked; "
                f"--recompute to measure again")
        return {}
    run, config, data, model, params, order, _ = restored or restore(path, todo[0][0], device, data_dir)
    loaded = targets[0][0] if restored else todo[0][0]
    # the batches of train metrics (metrics.train_metrics): slices of the epoch-0 permutation
    permutation = order.permutation(0)[:num_batches * config.batch_size]
    units = sum(cost_units(missing, num_batches, probes, lanczos) for _, _, missing in todo)
    measured = {}
    message(f"measuring {len(todo)} checkpoint(s) of {run} over {num_batches} batches of {config.batch_size}")
    done, it, m = 0, todo[0][1], todo[0][2][0]
    with StopRequest() as stop, StepProgress(units, label="curvature") as bar, tf32(allow_tf32):
        def advance():  # after each batch pass: a stop signal gives up the value under way
            nonlocal done
            stop.check()
            done += 1
            if bar.due():
                bar.update(done)

        def log(text):
            left = bar.time_left(done)
            bar.log(f"step {it:>7d}  {m} {text}" + (f"  ({left})" if left else ""))

        try:
            for which, it, missing in todo:
                if which != loaded:
                    RunState.from_checkpoint(run.load_checkpoint(which), model, params, run.checkpoint_path(which))
                    loaded = which
                for m in missing:  # one at a time, so that long work shows a line as each value comes
                    if not recompute and store.has(it, m, column_options[m]):
                        continue  # another process measured it meanwhile
                    stop.check()
                    value = measure(model, params, data.train_x, data.train_y, config.loss, permutation,
                                    config.batch_size, [m], probes, lanczos, bn_mode, seed, it, advance, sigma,
                                    lambda k: log(f"probe {k} of {probes} done"))[m]
                    try:
                        store.add(it, m, value, column_options[m], recompute)
                    except CannotWrite as e:
                        raise CannotWrite(f"{e}: {m} at step {it} ({describe(value)}) is not saved, the values before "
                                          f"it are; free some space, then run the same command to measure the "
                                          f"rest") from e
                    measured.setdefault(it, {})[m] = value
                    log(describe(value))
        except StopNow as e:
            files = [path for path in dict.fromkeys(map(store.path_of, measures)) if os.path.exists(path)]
            kept = (f"the values measured before it are kept in {' and '.join(files)}" if files
                    else "nothing measured yet")
            raise Interrupted(f"interrupted{by_signal(e.signum)} at step {it} ({m}): {kept}; run the same command to "
                              f"measure the rest", e.signum) from e
        bar.update(done)
    return measured

"""Is the GAN any good? Pictures and numbers comparing its stamps with real injected lenses.

Three checks, each against freshly injected lenses from the dataset the GAN was trained on (drawn
exactly as its training positives were, :class:`training.gan.InjectedLenses`):

- **A sample grid**: generated and injected stamps side by side as Lupton asinh RGB composites
  (``training.show.colour_composite``, the colours of ``lensscan show-injections``).
- **Photometry**: per-band aperture magnitudes and colours (g-r, r-i, ...) of both sets, with
  histograms and Kolmogorov-Smirnov statistics. Generated stamps exist only in the normalised
  space, so both sets are measured from their normalised values by identical arithmetic: the asinh
  stretch is inverted exactly (``softening_sigma * sinh(value)`` is the pixel in units of its
  stamp's sky noise), summed in a circular aperture on the centre, and put on the AB scale with
  the training data's median zero point and sky noise per band. Differences between the sets are
  therefore the GAN's, not the arithmetic's.
- **A feature-space distance**: the Fréchet distance between Gaussians fitted to the penultimate
  layer (``forward_features``) of one of our own classifiers, on generated vs injected stamps (the
  FID recipe with our classifier in place of Inception). Two references make it readable: injected
  vs injected lenses of another seed (the floor at this sample size) and injected lenses vs plain
  negatives (what a real difference looks like).

Example
-------
>>> report = gan_quality("gan-out", "demo-set", "gan-quality")   # doctest: +SKIP
>>> report["frechet_feature_distance"]                             # doctest: +SKIP
{'gan_vs_injected': ..., 'injected_vs_injected': ..., 'injected_vs_negatives': ...}
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats

from scanner import storage
from scanner.config import InputSpec
from scanner.normalise import normalise
from scanner.registry import default_models_dir, load_version, resolve_version_dirs
from training.dataset import DatasetError, iter_pool, open_dataset, read_pool
from training.gan import (GanConfig, GanError, GeneratedLenses, InjectedLenses, derive_seed,
                          read_gan_meta, write_gan_meta)
from training.show import colour_composite

logger = logging.getLogger(__name__)

REPORT_JSON = "quality.json"
REPORT_PNG = "quality.png"
SAMPLES_PNG = "samples.png"


@dataclass(frozen=True)
class QualityConfig:
    """How the GAN is checked.

    Parameters
    ----------
    n_stamps : int
        Stamps per set (generated, injected, injected of another seed, negatives); fewer when the
        dataset has fewer plain negatives, so that every distance uses the same sample size (the
        Fréchet distance is biased upwards at small sizes).
    aperture_radius_arcsec : float
        Radius of the central aperture of the photometry: 4" holds arcs of Einstein radii up to
        3" plus the seeing.
    classifier : str, optional
        Model version directory whose penultimate layer gives the features; default the first
        version of the shipped default ensemble.
    seed : int
        Seeds the generated and injected sets.
    n_grid : int
        Generated and injected stamps each in the sample grid.
    """

    n_stamps: int = 1024
    aperture_radius_arcsec: float = 4.0
    classifier: str | None = None
    seed: int = 0
    n_grid: int = 16

    def __post_init__(self) -> None:
        if self.n_stamps < 2 or self.n_grid < 1 or self.aperture_radius_arcsec <= 0:
            raise ValueError(f"QualityConfig: n_stamps={self.n_stamps} must be >= 2, n_grid="
                             f"{self.n_grid} >= 1, aperture_radius_arcsec > 0")


# --------------------------------------------------------------------------------------------
# Measurements


def noise_units(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Normalised stamps back to pixels in units of their stamp's sky noise (the asinh undone).

    ``asinh_robust`` stores ``asinh(p / (softening_sigma * sigma))`` for a sky-subtracted pixel
    ``p`` and sky noise ``sigma``; this returns ``p / sigma``.
    """
    if spec.normalisation != "asinh_robust":
        raise ValueError(f"the photometry inverts 'asinh_robust'; this spec normalises with "
                         f"{spec.normalisation!r}")
    return spec.softening_sigma * np.sinh(np.asarray(x, dtype=np.float64))


def aperture_sums(x: np.ndarray, spec: InputSpec, radius_arcsec: float) -> np.ndarray:
    """Per-band sums (N, C) of :func:`noise_units` in a circle of ``radius_arcsec`` on the centre."""
    size = spec.stamp_size_pix
    r = np.hypot(*np.meshgrid(np.arange(size) - (size - 1) / 2, np.arange(size) - (size - 1) / 2))
    inside = r <= radius_arcsec / spec.pixel_scale_arcsec
    return noise_units(x, spec)[:, :, inside].sum(axis=2)


def ab_magnitudes(sums: np.ndarray, magzero: Sequence[float], sky_sigma: Sequence[float]
                  ) -> np.ndarray:
    """AB magnitudes (N, C) of aperture sums in sky-noise units, on a typical zero point and noise.

    NaN where the sum is not positive.
    """
    counts = sums * np.asarray(sky_sigma)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        mags = np.asarray(magzero)[None, :] - 2.5 * np.log10(counts)
    return np.where(counts > 0, mags, np.nan)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` (N, F) and ``b`` (M, F).

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``; the trace of the matrix square root
    is taken from the eigenvalues of ``S_a^(1/2) S_b S_a^(1/2)`` (symmetric), which stays real and
    finite for the singular covariances of small samples.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu = a.mean(0) - b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(mu @ mu + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def classifier_features(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Penultimate-layer features (N, F) of ``model`` on normalised stamps ``x``, in eval mode."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out.append(model.forward_features(x[start:start + batch_size].float()).cpu().numpy())
    return np.concatenate(out)


def _summary(values: np.ndarray) -> dict[str, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return {"median": float("nan"), "p16": float("nan"), "p84": float("nan"), "n": 0}
    p16, median, p84 = np.percentile(v, [16, 50, 84])
    return {"median": float(median), "p16": float(p16), "p84": float(p84), "n": int(v.size)}


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        return float("nan")
    return float(stats.ks_2samp(a, b).statistic)


def colour_names(bands: Sequence[str]) -> list[str]:
    """Colours of neighbouring bands in channel order: ``g-r``, ``r-i`` for g, r, i."""
    return [f"{bands[k]}-{bands[k + 1]}" for k in range(len(bands) - 1)]


def photometry(sets: dict[str, np.ndarray], spec: InputSpec, display: dict[str, Any],
               radius_arcsec: float) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Aperture magnitudes and colours of each set: summaries, KS statistics and the values.

    KS statistics compare ``gan`` with ``injected`` and, for scale, ``injected`` with
    ``injected_other_seed``. A band's KS statistic is computed on the aperture sums, so it counts
    stamps whose sum is not positive (no magnitude); KS is unchanged by the monotonic map to
    magnitudes otherwise. Colours count the stamps with both sums positive.
    """
    bands = list(spec.bands)
    values: dict[str, dict[str, np.ndarray]] = {}
    sums: dict[str, np.ndarray] = {}
    for name, x in sets.items():
        sums[name] = aperture_sums(x, spec, radius_arcsec)
        mags = ab_magnitudes(sums[name], display["magzero"], display["sky_sigma"])
        per = {f"mag_{b}": mags[:, k] for k, b in enumerate(bands)}
        for k, colour in enumerate(colour_names(bands)):
            per[colour] = mags[:, k] - mags[:, k + 1]
        per["pixel_" + bands[len(bands) // 2]] = x[:, len(bands) // 2].ravel()
        values[name] = per
    pairs = [("ks_gan_vs_injected", "gan", "injected")]
    if "injected_other_seed" in sets:
        pairs.append(("ks_injected_vs_injected", "injected", "injected_other_seed"))
    report: dict[str, Any] = {}
    for quantity in values["gan"]:
        entry: dict[str, Any] = {name: _summary(v[quantity]) for name, v in values.items()}
        band = quantity.removeprefix("mag_")
        for key, a, b in pairs:
            if quantity.startswith("mag_"):
                k = bands.index(band)
                entry[key] = _ks(sums[a][:, k], sums[b][:, k])
            else:
                entry[key] = _ks(values[a][quantity], values[b][quantity])
        if quantity.startswith("mag_"):
            k = bands.index(band)
            entry["nonpositive_fraction"] = {name: float((s[:, k] <= 0).mean())
                                             for name, s in sums.items()}
        report[quantity] = entry
    return report, values


# --------------------------------------------------------------------------------------------
# Pictures


def composites(x: np.ndarray, spec: InputSpec, display: dict[str, Any]) -> np.ndarray:
    """Lupton RGB images (N, S, S, 3) of normalised stamps, on the data's typical photometry.

    Each band is turned back into counts with :func:`noise_units` times the band's typical sky
    noise, then drawn by ``training.show.colour_composite`` like raw stamps.
    """
    n = len(x)
    magzero = np.tile(np.asarray(display["magzero"], np.float64), (n, 1))
    sky = np.tile(np.asarray(display["sky_sigma"], np.float64), (n, 1))
    counts = noise_units(x, spec) * sky[..., None, None]
    return colour_composite(counts, spec.bands, magzero, sky)


def sample_grid_png(rows: dict[str, np.ndarray], spec: InputSpec, display: dict[str, Any],
                    n_cols: int = 8, dpi: int = 100) -> bytes:
    """A PNG of labelled blocks of stamps, one block per entry of ``rows`` (label -> stamps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [(label, composites(x, spec, display)) for label, x in rows.items() if len(x)]
    n_rows = sum(-(-len(images) // n_cols) for _, images in blocks)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.0 * n_cols, 1.0 * n_rows + 0.2),
                             squeeze=False)
    r = 0
    for label, images in blocks:
        for k in range(-(-len(images) // n_cols) * n_cols):
            ax = axes[r + k // n_cols, k % n_cols]
            ax.set_xticks([])
            ax.set_yticks([])
            if k < len(images):
                ax.imshow(images[k], origin="lower", interpolation="nearest")
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(label, fontsize=8)
        r += -(-len(images) // n_cols)
    fig.tight_layout(pad=0.2)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return _palette_png(buffer.getvalue())


def _palette_png(png: bytes) -> bytes:
    """The PNG with a 256-colour palette: sky noise makes full-colour grids compress poorly
    (about half the bytes, no visible change)."""
    from PIL import Image

    out = io.BytesIO()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, format="PNG", optimize=True)
    return out.getvalue()


def histograms_png(values: dict[str, dict[str, np.ndarray]], fd: dict[str, float]) -> bytes:
    """A PNG of per-band magnitude, colour and pixel-value histograms of every set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantities = list(values["gan"])
    n_cols = 3
    n_rows = -(-len(quantities) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.0 * n_cols, 2.8 * n_rows), squeeze=False)
    styles = {"gan": ("GAN", "tab:red"), "injected": ("injected lenses", "tab:blue"),
              "injected_other_seed": ("injected, other seed", "tab:cyan"),
              "negatives": ("plain negatives", "tab:grey")}
    for ax, quantity in zip(axes.ravel(), quantities):
        finite = [v[quantity][np.isfinite(v[quantity])] for v in values.values()]
        pooled = np.concatenate([f for f in finite if f.size])
        if pooled.size == 0:
            ax.set_title(f"{quantity}: no finite values", fontsize=9)
            continue
        lo, hi = np.percentile(pooled, [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
        for name, v in values.items():
            label, colour = styles.get(name, (name, None))
            f = v[quantity][np.isfinite(v[quantity])]
            if f.size:
                ax.hist(np.clip(f, bins[0], bins[-1]), bins=bins, density=True, histtype="step",
                        color=colour, label=label, lw=1.4 if name == "gan" else 1.0)
        title = quantity.replace("mag_", "aperture mag ").replace("pixel_", "normalised pixels ")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(quantities):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Fréchet feature distance: " + ", ".join(f"{k} {v:.3g}" for k, v in fd.items()),
                 fontsize=9)
    fig.tight_layout(pad=0.4)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# The report


def _negatives(data_url: str, spec: InputSpec, n: int) -> np.ndarray:
    """Up to ``n`` normalised plain negatives: the train split's non-lens pool."""
    parts, have = [], 0
    for chunk in iter_pool(data_url, "non_lens", "train", batch_rows=max(n, 256)):
        parts.append(chunk.stamps[:n - have])
        have += len(parts[-1])
        if have >= n:
            break
    if not parts:
        raise DatasetError(f"{data_url}: no train non-lens stamps to compare against; build the "
                           f"dataset with --non-lens-fraction > 0")
    return normalise(np.concatenate(parts), spec)


def default_classifier() -> Path:
    """The first version of the shipped default ensemble."""
    return resolve_version_dirs([default_models_dir()])[0]


def gan_quality(gan_dir: str | Path, data_url: str, out_dir: str | Path,
                config: QualityConfig = QualityConfig()) -> dict[str, Any]:
    """Measure the GAN in ``gan_dir`` against injected lenses of ``data_url``; write a report.

    Writes ``quality.json`` (the numbers), ``quality.png`` (histograms) and ``samples.png`` (the
    grid) into ``out_dir``, records the headline numbers in the GAN's ``gan.json`` under
    ``quality``, and returns the JSON's content.

    Raises
    ------
    GanError
        The classifier's input spec differs from the GAN's.
    DatasetError
        The dataset has no deflectors or plain negatives to compare against.
    """
    lenses = GeneratedLenses(gan_dir)
    spec, display = lenses.spec, lenses.meta["display"]
    info = open_dataset(data_url)
    if InputSpec.from_dict(info["input_spec"]) != spec:
        raise GanError(f"the dataset {data_url} has input spec {info['input_spec']}, the GAN "
                       f"{spec.to_dict()}: compare a GAN with the dataset it was trained on")
    classifier_dir = Path(config.classifier) if config.classifier else default_classifier()
    version = load_version(classifier_dir)
    if version.input_spec != spec:
        raise GanError(f"classifier {classifier_dir} reads {version.input_spec}, the GAN makes "
                       f"{spec}: give --classifier a version of the same input spec")

    negatives = _negatives(data_url, spec, config.n_stamps)
    n = len(negatives)
    if n < config.n_stamps:
        logger.warning("only %d plain negatives in %s: every set uses %d stamps", n, data_url, n)
    injection = GanConfig.from_dict(lenses.meta["training"]["config"]).injection
    deflectors = read_pool(data_url, "deflector", "train")
    if len(deflectors) == 0:
        raise DatasetError(f"{data_url}: no train deflectors to inject lenses into")

    def injected(purpose: int) -> np.ndarray:
        source = InjectedLenses(deflectors, spec, injection, min(n, 256),
                                derive_seed(config.seed, purpose))
        return source.take(n).numpy()

    sets = {"gan": lenses.sample(n, torch.Generator().manual_seed(config.seed)).numpy(),
            "injected": injected(101), "injected_other_seed": injected(102),
            "negatives": negatives}
    features = {name: classifier_features(version.model, torch.from_numpy(x))
                for name, x in sets.items()}
    fd = {"gan_vs_injected": frechet_distance(features["gan"], features["injected"]),
          "injected_vs_injected": frechet_distance(features["injected"],
                                                   features["injected_other_seed"]),
          "injected_vs_negatives": frechet_distance(features["injected"], features["negatives"])}
    phot, values = photometry(sets, spec, display, config.aperture_radius_arcsec)
    scale = float(lenses.meta["output_scale"])
    report = {
        "gan": {"path": str(Path(gan_dir)), "content_hash": lenses.content_hash,
                "steps": lenses.meta["training"]["steps"]},
        "data": data_url,
        "n_stamps": n,
        "config": asdict(config),
        "classifier": {"path": str(classifier_dir), "name": version.name,
                       "version": version.version, "content_hash": version.content_hash,
                       "method": version.meta.get("training", {}).get("method"),
                       "num_features": int(features["gan"].shape[1])},
        "frechet_feature_distance": fd,
        "photometry": {
            "definition": (f"aperture magnitudes: sum of softening_sigma*sinh(normalised value) "
                           f"(pixels in sky-noise units) within {config.aperture_radius_arcsec}\" "
                           f"of the centre, times the data's median sky noise, on its median zero "
                           f"point (AB); colours are differences of neighbouring bands; the same "
                           f"arithmetic for every set. KS = two-sample Kolmogorov-Smirnov statistic."),
            "magzero": display["magzero"], "sky_sigma": display["sky_sigma"], **phot},
        "saturated_pixel_fraction": float((np.abs(sets["gan"]) > 0.99 * scale).mean()),
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out = str(out_dir)
    storage.write_bytes_atomic(storage.join(out, REPORT_JSON), json.dumps(report, indent=1).encode())
    storage.write_bytes_atomic(storage.join(out, REPORT_PNG), histograms_png(values, fd))
    k = min(config.n_grid, n)
    storage.write_bytes_atomic(storage.join(out, SAMPLES_PNG), sample_grid_png(
        {"GAN": sets["gan"][:k], "injected": sets["injected"][:k]}, spec, display))
    meta = read_gan_meta(gan_dir)
    meta["quality"] = {"frechet_feature_distance": fd, "n_stamps": n,
                       "classifier": report["classifier"], "report": str(out_dir),
                       "measured": report["measured"]}
    write_gan_meta(gan_dir, meta)
    logger.info("GAN quality: Fréchet feature distance %s", fd)
    return report

"""Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

  FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})

(Heusel et al. 2017, "GANs trained by a two time-scale update rule ..."). The feature space
is the caller's: Inception-v3 pool3 for FID (inception.py), the digits classifier's hidden
units for the digits FD (digits_classifier.py).

The estimate is biased upwards at small N: the sample mean alone adds about
Tr(S_a)/N_a + Tr(S_b)/N_b, and the square-root term adds more when N is not much larger than
the feature dimension. Compare values only at equal sample counts.
"""

import numpy as np


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
  """Mean and unbiased covariance (ddof=1) of features [N, D], N >= 2."""
  feats = np.asarray(feats, np.float64)
  if feats.ndim != 2 or feats.shape[0] < 2:
    raise ValueError(f"features must be [N, D] with N >= 2 samples, got shape {feats.shape}.")
  return feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False))


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix (via eigh)."""
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
  """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) (Fréchet distance of Gaussians).

  Tr((S_a S_b)^{1/2}) is computed as the sum of the square roots of the eigenvalues of the
  symmetric PSD matrix S_a^{1/2} S_b S_a^{1/2}, which are the eigenvalues of S_a S_b. This is
  real by construction, so unlike scipy.linalg.sqrtm(S_a @ S_b) it needs no eps offset and
  no discarding of an imaginary part when covariances are singular (N < D, dead features).
  """
  mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
  cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
  if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != mu_a.shape * 2:
    raise ValueError(f"mismatched statistics: means {mu_a.shape}, {mu_b.shape}, covariances "
                     f"{cov_a.shape}, {cov_b.shape}; both feature sets need the same dim.")
  sqrt_a = _psd_sqrt(cov_a)
  eig = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
  tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
  diff = mu_a - mu_b
  return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)


def frechet_distance(feats_a, feats_b) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets [N_a, D] and [N_b, D].

  Biased upwards at finite N (see the module docstring): compare values at equal N.
  """
  return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))

"""Sample-quality measures for the embedded digits data, computed offline.

FID and CLIP score need network weights that a fresh machine cannot download (inception.py
and clip.py load them from files the user provides). For scikit-learn's 8x8 digits the
evaluation trains its own feature network instead: `DigitsClassifier`, a 64-64-10 ReLU MLP
fitted on the digits TRAIN split in about a second. Its hidden activations are the feature
space of a digits Fréchet distance ("FD", the FID recipe of frechet.py with this network in
place of Inception), and its predictions measure whether a conditional sample shows the digit
it was asked for.

  * `real_digits`: the real images and labels of a split, read from scikit-learn; the
    training data (launch/data/digits.py) takes its arrays and split from here, so the
    classifier and the diffusion models see the same examples.
  * `class_accuracy` / `prompt_alignment`: share of samples classified as their target digit
    (prompts may be given as labels or as captions that name the digit).
  * `digits_frechet_distance`: FD of samples against a real split, in the classifier's space.
  * `digits_report`: {"fd": ..., "accuracy": ...}, the one call the Imagen and distillation
    evaluations make.

Classifier accuracy on the real digits test split (297 images): 0.926 (275/297) with the
default settings (tests/test_evaluation.py asserts > 0.9). The same classifier on the real
test images gives `prompt_alignment` = 0.926 with the true labels and about 0.1 with shuffled
ones, so a sampler that reaches ~0.9 makes digits as recognisable as real ones.

Fréchet distances in this feature space, for scale (297 samples against the test split):
the first 297 images of the train split give FD 0.83 (the floor a perfect sampler approaches;
the whole train split gives 0.68), uniform-noise images 7.7, and the train split's 153 threes
(one class: mode collapse) 29. The features are digit-shape detectors: they see wrong or
missing digits strongly but pixel noise weakly (real images plus Gaussian noise of 3 levels:
1.05). The estimate is biased upwards at small N: the sample mean alone adds about
Tr(S_a)/N_a + Tr(S_b)/N_b, and the square-root term adds more when N is not much larger than
the feature dimension (64). Compare FDs only at equal sample counts (297 against the test
split is the natural choice) and read them against the real-data floor.

Images are integer levels 0..num_levels-1 of shape [N, 8, 8, 1]; the classifier sees them
scaled to [0, 1], so samples quantised to another number of levels can be passed with their
`num_levels`.
"""

import functools

import numpy as np

from evaluation import frechet

# --- the real digits -------------------------------------------------------------------------
# sklearn.datasets.load_digits: 1,797 images of 8x8 pixels whose values are the integers 0..16
# (each pixel counts the "on" cells of a 4x4 block of a 32x32 bitmap), labels 0..9.

NUM_LEVELS = 17  # pixel values 0..16
NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
NUM_EXAMPLES = 1797
NUM_TRAIN = 1500  # "test" is the last NUM_EXAMPLES - NUM_TRAIN = 297 examples
SPLITS = ("train", "test")

# The words that name a digit in a caption (launch/data/digits.py writes captions with them).
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
               "nine")


@functools.lru_cache(maxsize=1)
def load_all() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits as (images uint8 [N, 8, 8, 1] in 0..16, labels int32 [N]), read-only."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  (slow import)
  digits = datasets.load_digits()
  images = np.asarray(digits.images)
  if images.shape != (NUM_EXAMPLES, 8, 8) or images.min() < 0 or images.max() >= NUM_LEVELS:
    raise RuntimeError(f"unexpected load_digits data: shape {images.shape}, values "
                       f"{images.min()}..{images.max()}; expected ({NUM_EXAMPLES}, 8, 8) "
                       "in 0..16. Check the installed scikit-learn.")
  images = np.rint(images).astype(np.uint8)[..., None]
  labels = np.asarray(digits.target, dtype=np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def split_indices(split: str) -> np.ndarray:
  """The global (load_digits) indices of a split: first 1,500 train, last 297 test.

  Deterministic, no shuffling: example `i` of "test" is example `1500 + i` of load_digits.
  """
  if split == "train":
    return np.arange(0, NUM_TRAIN)
  if split == "test":
    return np.arange(NUM_TRAIN, NUM_EXAMPLES)
  raise ValueError(f"unknown digits split {split!r}; valid splits: {SPLITS}")


def real_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Real images [N, 8, 8, 1] (levels 0..16) and labels of a split: train, test or all."""
  images, labels = load_all()
  if split == "all":
    return images, labels
  idx = split_indices(split)  # raises on an unknown split
  return images[idx], labels[idx]


# --- input checks ----------------------------------------------------------------------------

def check_digit_images(images_int, num_levels: int = NUM_LEVELS) -> np.ndarray:
  """Validates integer digit images [N, 8, 8, 1] in 0..num_levels-1; returns them in [0, 1].

  The output is float64 of shape [N, 64] (flattened), the classifier's input.
  """
  images = np.asarray(images_int)
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
    raise ValueError(f"digit images must have shape [N, 8, 8, 1], got {images.shape}; add the "
                     "channel axis with images[..., None] or reshape generated samples first.")
  if images.shape[0] == 0:
    raise ValueError("got 0 images; pass at least one sample.")
  if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
    raise ValueError(f"digit images must be integer levels, got dtype {images.dtype}.")
  if np.issubdtype(images.dtype, np.floating) and not np.all(images == np.round(images)):
    raise ValueError("digit images must be integer levels 0..num_levels-1, got non-integer "
                     "floats; quantise samples to levels first (e.g. the sampler's discrete "
                     "decoder output, or np.rint of x scaled to 0..num_levels-1).")
  lo, hi = images.min(), images.max()
  if lo < 0 or hi > num_levels - 1:
    raise ValueError(f"digit image levels must lie in 0..{num_levels - 1} (num_levels="
                     f"{num_levels}), got values {lo}..{hi}; pass the num_levels the samples "
                     "were quantised to.")
  return images.reshape(len(images), -1).astype(np.float64) / (num_levels - 1)


def labels_from_prompts(prompts) -> np.ndarray:
  """Digit labels from integer labels or from captions that name one digit.

  Captions follow launch/data/digits.py: the digit appears once, as a numeral ("the number 7")
  or as a word ("a picture of a seven"). A caption naming no digit, or two, is an error.
  """
  prompts = list(prompts) if not isinstance(prompts, np.ndarray) else prompts
  if len(prompts) and all(isinstance(p, str) for p in prompts):
    return np.array([_label_from_caption(p) for p in prompts], np.int64)
  labels = np.asarray(prompts)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"target labels must be a 1-D array of ints (or a list of captions), got "
                     f"shape {labels.shape} and dtype {labels.dtype}.")
  if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise ValueError(f"digit labels must lie in 0..9, got {labels.min()}..{labels.max()}.")
  return labels.astype(np.int64)


def _label_from_caption(caption: str) -> int:
  words = caption.lower().replace(",", " ").split()
  found = {int(w) for w in words if w.isdigit() and len(w) == 1}
  found |= {DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS}
  if len(found) != 1:
    raise ValueError(f"caption {caption!r} names {len(found)} digits; prompt alignment needs "
                     "exactly one (as a numeral 0-9 or a word zero-nine), or pass labels.")
  return found.pop()


# --- the classifier --------------------------------------------------------------------------

FEATURE_DIM = 64  # hidden units: the dimension of the digits FD's feature space


class DigitsClassifier:
  """A 64-64-10 ReLU MLP on flattened digits in [0, 1]; `features` are its hidden units.

  Weights are plain numpy arrays (w1 [64, H], b1 [H], w2 [H, 10], b2 [10]); `save` and `load`
  store them as .npz (no pickle). Use `get_classifier()` for the process-wide trained one.
  """

  def __init__(self, w1, b1, w2, b2):
    self.w1, self.b1, self.w2, self.b2 = (np.asarray(a, np.float64) for a in (w1, b1, w2, b2))

  @classmethod
  def train(cls, *, hidden: int = 64, steps: int = 400, learning_rate: float = 1e-2,
            weight_decay: float = 1e-3, seed: int = 0) -> "DigitsClassifier":
    """Fits the MLP on the digits TRAIN split: full-batch Adam on softmax cross-entropy.

    Deterministic (fixed seed, full batch, BLAS limited to one thread, which is also much
    faster than several threads for matrices this small); a second or two on one core.
    """
    import threadpoolctl  # pylint: disable=g-import-not-at-top  (ships with scikit-learn)
    images, labels = real_digits("train")
    x = check_digit_images(images)
    onehot = np.eye(NUM_CLASSES)[labels]
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=(x.shape[1], hidden)) * np.sqrt(2.0 / x.shape[1]),  # He init
              np.zeros(hidden),
              rng.normal(size=(hidden, NUM_CLASSES)) * np.sqrt(1.0 / hidden),
              np.zeros(NUM_CLASSES)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    b1_, b2_ = 0.9, 0.999
    with threadpoolctl.threadpool_limits(1):
      for t in range(1, steps + 1):
        grads = _cross_entropy_grads(params, x, onehot, weight_decay)
        for i, g in enumerate(grads):  # Adam (Kingma & Ba 2015, Algorithm 1)
          m[i] = b1_ * m[i] + (1 - b1_) * g
          v[i] = b2_ * v[i] + (1 - b2_) * g * g
          m_hat, v_hat = m[i] / (1 - b1_**t), v[i] / (1 - b2_**t)
          params[i] = params[i] - learning_rate * m_hat / (np.sqrt(v_hat) + 1e-8)
    return cls(*params)

  def features(self, images_int, num_levels: int = NUM_LEVELS) -> np.ndarray:
    """Hidden ReLU activations [N, hidden]: the feature space of the digits FD."""
    return np.maximum(check_digit_images(images_int, num_levels) @ self.w1 + self.b1, 0.0)

  def logits(self, images_int, num_levels: int = NUM_LEVELS) -> np.ndarray:
    return self.features(images_int, num_levels) @ self.w2 + self.b2

  def predict(self, images_int, num_levels: int = NUM_LEVELS) -> np.ndarray:
    return np.argmax(self.logits(images_int, num_levels), axis=-1)

  def save(self, path: str) -> None:
    np.savez(path, w1=self.w1, b1=self.b1, w2=self.w2, b2=self.b2)

  @classmethod
  def load(cls, path: str) -> "DigitsClassifier":
    with np.load(path, allow_pickle=False) as f:
      return cls(f["w1"], f["b1"], f["w2"], f["b2"])


def _cross_entropy_grads(params, x, onehot, weight_decay):
  """Gradients of mean softmax cross-entropy + weight_decay/2 ||W||^2 for the 2-layer MLP."""
  w1, b1, w2, b2 = params
  pre = x @ w1 + b1
  h = np.maximum(pre, 0.0)
  logits = h @ w2 + b2
  logits -= logits.max(axis=1, keepdims=True)
  probs = np.exp(logits)
  probs /= probs.sum(axis=1, keepdims=True)
  g_logits = (probs - onehot) / len(x)
  g_h = (g_logits @ w2.T) * (pre > 0)
  return [x.T @ g_h + weight_decay * w1, g_h.sum(0),
          h.T @ g_logits + weight_decay * w2, g_logits.sum(0)]


@functools.lru_cache(maxsize=1)
def get_classifier() -> DigitsClassifier:
  """The default classifier, trained once per process."""
  return DigitsClassifier.train()


# --- conditional accuracy --------------------------------------------------------------------

def class_accuracy(images_int, labels, classifier: DigitsClassifier | None = None,
                   num_levels: int = NUM_LEVELS) -> float:
  """Share of class-conditional samples that the classifier assigns to their class."""
  labels = labels_from_prompts(labels)
  if len(labels) != len(np.asarray(images_int)):
    raise ValueError(f"got {len(np.asarray(images_int))} images but {len(labels)} labels; "
                     "pass one target per image.")
  classifier = classifier or get_classifier()
  return float(np.mean(classifier.predict(images_int, num_levels) == labels))


def prompt_alignment(images_int, target_labels, classifier: DigitsClassifier | None = None,
                     num_levels: int = NUM_LEVELS) -> float:
  """Share of text-conditional samples classified as the digit their prompt names.

  `target_labels` are ints 0..9 or the prompts themselves (captions naming one digit).
  """
  return class_accuracy(images_int, target_labels, classifier, num_levels)


# --- Fréchet distance to the real digits ------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _reference_stats(reference: str, classifier: DigitsClassifier):
  images, _ = real_digits(reference)
  return frechet.gaussian_stats(classifier.features(images))


def digits_frechet_distance(images_int, num_levels: int = NUM_LEVELS,
                            reference: str = "test",
                            classifier: DigitsClassifier | None = None) -> float:
  """FD between samples and a real digits split ("test", "train" or "all") in classifier space."""
  if reference not in ("test", "train", "all"):
    raise ValueError(f"unknown reference {reference!r}; use 'test', 'train' or 'all'.")
  classifier = classifier or get_classifier()
  feats = classifier.features(images_int, num_levels)
  if len(feats) < 2:
    raise ValueError("a Fréchet distance needs at least 2 samples (a covariance); pass more "
                     "(297, the test split's size, is the recommended count).")
  return frechet.frechet_distance_from_stats(*frechet.gaussian_stats(feats),
                                             *_reference_stats(reference, classifier))


def upsample_to_digits(images_int) -> np.ndarray:
  """Images of a lower resolution that divides 8 (a cascade's base stage) enlarged by
  nearest neighbour to the digits' 8x8, so the classifier can score them; 8x8 passes as is."""
  images = np.asarray(images_int)
  size = IMAGE_SHAPE[0]
  if images.ndim == 4 and images.shape[1] != size:
    images = images.repeat(size // images.shape[1], axis=1).repeat(size // images.shape[2],
                                                                   axis=2)
  return images


def digits_report(images_int, labels=None, num_levels: int = NUM_LEVELS,
                  reference: str = "test") -> dict:
  """{"fd": FD against the real `reference` split, "accuracy": share classified as `labels`}.

  `labels` (ints or captions naming one digit) is optional; without it "accuracy" is absent.
  """
  report = {"fd": digits_frechet_distance(images_int, num_levels, reference)}
  if labels is not None:
    report["accuracy"] = class_accuracy(images_int, labels, num_levels=num_levels)
  return report

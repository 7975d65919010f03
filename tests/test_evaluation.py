"""evaluation/: digits classifier, Fréchet distance, FID Inception and CLIP score.

References are independent of the code under test: the classifier is re-evaluated from its
raw weights; the Fréchet distance against closed forms and scipy.linalg.sqrtm; the FID
Inception against a PyTorch transcription of torchvision's Inception3 with pytorch-fid's
patches, loaded from a full-size file with the released tensor names (random values); the
CLIP towers and tokenizer against transformers' CLIPModel / CLIPTokenizer saved tiny and
random with save_pretrained.
"""

import json
import os
import sys

import numpy as np
import pytest
import scipy.linalg
import threadpoolctl

from evaluation import clip, clip_tokenizer, frechet, inception, pretrained
from evaluation import digits_classifier as dc
from launch.data import digits as digits_data


# --- digits classifier and conditional accuracy ------------------------------------------------

@pytest.fixture(scope="module")
def clf():
  return dc.get_classifier()


@pytest.fixture(scope="module")
def real():
  return dc.real_digits("test"), dc.real_digits("train")


def _raw_predict(c, images):
  """The MLP written out again from its weights: argmax(relu(x W1 + b1) W2 + b2), x = v / 16."""
  x = images.reshape(len(images), -1) / 16.0
  return np.argmax(np.maximum(x @ c.w1 + c.b1, 0) @ c.w2 + c.b2, axis=1)


def test_classifier_accuracy_on_test_split(clf, real, tmp_path):
  (images, labels), _ = real
  assert images.shape == (297, 8, 8, 1)
  accuracy = np.mean(_raw_predict(clf, images) == labels)
  assert accuracy > 0.9
  assert clf.w1.shape == (64, dc.FEATURE_DIM)
  path = str(tmp_path / "digits_classifier.npz")  # .npz of weights round-trips exactly
  clf.save(path)
  np.testing.assert_array_equal(dc.DigitsClassifier.load(path).features(images),
                                clf.features(images))


def test_prompt_alignment_of_real_images(clf, real):
  (images, labels), _ = real
  accuracy = np.mean(_raw_predict(clf, images) == labels)
  assert dc.prompt_alignment(images, labels) == pytest.approx(accuracy, abs=1e-12)
  assert dc.class_accuracy(images, labels, clf) == pytest.approx(accuracy, abs=1e-12)
  captions = [digits_data.caption_for(l, 1500 + i) for i, l in enumerate(labels)]
  assert dc.prompt_alignment(images, captions) == pytest.approx(accuracy, abs=1e-12)
  rng = np.random.default_rng(0)
  shuffled = [dc.prompt_alignment(images, rng.permutation(labels)) for _ in range(5)]
  assert 0.05 < np.mean(shuffled) < 0.16  # chance is ~0.1


def test_digits_frechet_distance_separates_real_from_bad_samples(clf, real):
  (test_images, _), (train_images, train_labels) = real
  rng = np.random.default_rng(0)
  real_fd = frechet.frechet_distance(clf.features(test_images), clf.features(train_images))
  subset_fd = dc.digits_frechet_distance(train_images[:297])  # equal N against the test split
  noise_fd = dc.digits_frechet_distance(rng.integers(0, 17, (297, 8, 8, 1)))
  collapsed_fd = dc.digits_frechet_distance(train_images[train_labels == 3])  # one class only
  assert 0 < real_fd < 2 and 0 < subset_fd < 2
  assert noise_fd > 5 * subset_fd
  assert collapsed_fd > 10 * subset_fd
  # The same images at another quantisation are the same [0, 1] inputs: the same FD.
  assert dc.digits_frechet_distance(train_images[:297] * 2, num_levels=33) == pytest.approx(
      subset_fd, rel=1e-9)


def test_digits_report(real):
  (images, labels), _ = real
  report = dc.digits_report(images[:100], labels[:100])
  assert set(report) == {"fd", "accuracy"}
  assert report["fd"] == pytest.approx(dc.digits_frechet_distance(images[:100]))
  assert report["accuracy"] == dc.class_accuracy(images[:100], labels[:100])
  assert set(dc.digits_report(images[:100])) == {"fd"}


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 8, 8), np.int32), r"shape \[N, 8, 8, 1\]"),
    (np.full((4, 8, 8, 1), 17), r"0\.\.16"),
    (np.full((4, 8, 8, 1), 0.5), "non-integer"),
    (np.zeros((0, 8, 8, 1), np.int32), "0 images"),
])
def test_bad_images_are_clear_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    dc.digits_report(bad)


def test_bad_prompts_are_clear_errors(real):
  (images, _), _ = real
  with pytest.raises(ValueError, match="names 2 digits"):
    dc.prompt_alignment(images[:1], ["a seven and an 8"])
  with pytest.raises(ValueError, match="2 images but 3 labels"):
    dc.class_accuracy(images[:2], [1, 2, 3])
  with pytest.raises(ValueError, match="0..9"):
    dc.class_accuracy(images[:1], [10])


# --- Fréchet distance against closed forms -----------------------------------------------------

def _with_exact_stats(mean, cov, n, seed):
  """n points whose sample mean is exactly `mean` and sample covariance (ddof=1) is `cov`."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, len(mean)))
  z -= z.mean(axis=0)
  cov_z = np.atleast_2d(np.cov(z, rowvar=False))
  z = z @ np.linalg.inv(np.linalg.cholesky(cov_z)).T  # whiten exactly
  return mean + z @ np.linalg.cholesky(cov).T


def test_frechet_distance_closed_forms():
  # 1-D: (m1 - m2)^2 + (s1 - s2)^2.
  a = _with_exact_stats(np.array([1.0]), np.array([[4.0]]), 50, 0)
  b = _with_exact_stats(np.array([-2.0]), np.array([[0.25]]), 70, 1)
  assert frechet.frechet_distance(a, b) == pytest.approx(9.0 + (2.0 - 0.5) ** 2, rel=1e-9)
  # Diagonal covariances: ||dmu||^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
  da, db = np.array([1.0, 2.0, 0.5, 3.0]), np.array([0.5, 2.0, 4.0, 0.1])
  ma, mb = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.5])
  expected = np.sum((ma - mb) ** 2) + np.sum((np.sqrt(da) - np.sqrt(db)) ** 2)
  a = _with_exact_stats(ma, np.diag(da), 200, 2)
  b = _with_exact_stats(mb, np.diag(db), 300, 3)
  assert frechet.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
  # Non-commuting covariances: the textbook formula with scipy.linalg.sqrtm(S_a S_b).
  rng = np.random.default_rng(4)
  ca, cb = [(lambda m: m @ m.T + 0.1 * np.eye(6))(rng.normal(size=(6, 6))) for _ in range(2)]
  ma, mb = rng.normal(size=6), rng.normal(size=6)
  textbook = (np.sum((ma - mb) ** 2) + np.trace(ca) + np.trace(cb)
              - 2 * np.trace(scipy.linalg.sqrtm(ca @ cb).real))
  got = frechet.frechet_distance(_with_exact_stats(ma, ca, 100, 5),
                                 _with_exact_stats(mb, cb, 80, 6))
  assert got == pytest.approx(textbook, rel=1e-8)
  assert frechet.frechet_distance_from_stats(ma, ca, mb, cb) == pytest.approx(textbook, rel=1e-8)


def test_frechet_distance_of_singular_covariances():
  """N < D (rank-deficient covariances, as FID at small N): FD(x, x) is 0, FD(x, y) > 0.

  The 44 zero eigenvalues of S^2 come out as +-1e-16 and their square roots as ~1e-8 each,
  so "0" is ~1e-7 of Tr(S): the floor of any method that takes eigenvalue square roots.
  """
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(20, 64)), rng.normal(size=(20, 64)) + 0.5
  assert abs(frechet.frechet_distance(x, x)) < 1e-6 * np.trace(np.cov(x, rowvar=False))
  assert frechet.frechet_distance(x, y) > 0
  with pytest.raises(ValueError, match="N >= 2"):
    frechet.frechet_distance(x[:1], y)


# --- FID: Inception-v3 against a PyTorch reference --------------------------------------------

def _torch_fid_inception():
  """torchvision's Inception3 (up to pool3) with pytorch-fid's patches, written in torch."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  class Conv(nn.Module):  # torchvision BasicConv2d
    def __init__(self, cin, cout, **kw):
      super().__init__()
      self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
      self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
      return F.relu(self.bn(self.conv(x)))

  avg = lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # FID patch

  class A(nn.Module):
    def __init__(self, cin, pool):
      super().__init__()
      self.branch1x1 = Conv(cin, 64, kernel_size=1)
      self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, kernel_size=1), Conv(48, 64, kernel_size=5, padding=2)
      self.branch3x3dbl_1 = Conv(cin, 64, kernel_size=1)
      self.branch3x3dbl_2 = Conv(64, 96, kernel_size=3, padding=1)
      self.branch3x3dbl_3 = Conv(96, 96, kernel_size=3, padding=1)
      self.branch_pool = Conv(cin, pool, kernel_size=1)

    def forward(self, x):
      return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                        self.branch_pool(avg(x))], 1)

  class B(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.branch3x3 = Conv(cin, 384, kernel_size=3, stride=2)
      self.branch3x3dbl_1 = Conv(cin, 64, kernel_size=1)
      self.branch3x3dbl_2 = Conv(64, 96, kernel_size=3, padding=1)
      self.branch3x3dbl_3 = Conv(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
      return torch.cat([self.branch3x3(x),
                        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                        F.max_pool2d(x, kernel_size=3, stride=2)], 1)

  class C(nn.Module):
    def __init__(self, cin, c7):
      super().__init__()
      h, v = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
      self.branch1x1 = Conv(cin, 192, kernel_size=1)
      self.branch7x7_1, self.branch7x7_2 = Conv(cin, c7, kernel_size=1), Conv(c7, c7, **h)
      self.branch7x7_3 = Conv(c7, 192, **v)
      self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, kernel_size=1), Conv(c7, c7, **v)
      self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, **h), Conv(c7, c7, **v)
      self.branch7x7dbl_5 = Conv(c7, 192, **h)
      self.branch_pool = Conv(cin, 192, kernel_size=1)

    def forward(self, x):
      b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
      d = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
      d = self.branch7x7dbl_5(self.branch7x7dbl_4(d))
      return torch.cat([self.branch1x1(x), b, d, self.branch_pool(avg(x))], 1)

  class D(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.branch3x3_1 = Conv(cin, 192, kernel_size=1)
      self.branch3x3_2 = Conv(192, 320, kernel_size=3, stride=2)
      self.branch7x7x3_1 = Conv(cin, 192, kernel_size=1)
      self.branch7x7x3_2 = Conv(192, 192, kernel_size=(1, 7), padding=(0, 3))
      self.branch7x7x3_3 = Conv(192, 192, kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7x3_4 = Conv(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
      b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
      return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b,
                        F.max_pool2d(x, kernel_size=3, stride=2)], 1)

  class E(nn.Module):
    def __init__(self, cin, max_pool):  # FIDInceptionE_2 (Mixed_7c) max-pools, E_1 averages
      super().__init__()
      self.max_pool = max_pool
      h, v = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
      self.branch1x1 = Conv(cin, 320, kernel_size=1)
      self.branch3x3_1 = Conv(cin, 384, kernel_size=1)
      self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, **h), Conv(384, 384, **v)
      self.branch3x3dbl_1 = Conv(cin, 448, kernel_size=1)
      self.branch3x3dbl_2 = Conv(448, 384, kernel_size=3, padding=1)
      self.branch3x3dbl_3a, self.branch3x3dbl_3b = Conv(384, 384, **h), Conv(384, 384, **v)
      self.branch_pool = Conv(cin, 192, kernel_size=1)

    def forward(self, x):
      b, d = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
      pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg(x)
      return torch.cat([self.branch1x1(x), self.branch3x3_2a(b), self.branch3x3_2b(b),
                        self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
                        self.branch_pool(pool)], 1)

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.Conv2d_1a_3x3 = Conv(3, 32, kernel_size=3, stride=2)
      self.Conv2d_2a_3x3 = Conv(32, 32, kernel_size=3)
      self.Conv2d_2b_3x3 = Conv(32, 64, kernel_size=3, padding=1)
      self.Conv2d_3b_1x1 = Conv(64, 80, kernel_size=1)
      self.Conv2d_4a_3x3 = Conv(80, 192, kernel_size=3)
      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
      self.Mixed_6a = B(288)
      self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
      self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = D(768), E(1280, False), E(2048, True)
      self.fc = nn.Linear(2048, 1008)  # present in the released file, unused for pool3

    def forward(self, x):  # N x 3 x H x W in [0, 1] -> N x 2048 (pytorch-fid block 3)
      x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
      x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
      x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, kernel_size=3, stride=2)))
      x = F.max_pool2d(x, kernel_size=3, stride=2)
      for n in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
        x = getattr(self, f"Mixed_{n}")(x)
      return x.mean(dim=(2, 3))

  return Net().eval()


@pytest.fixture(scope="module")
def torch_inception(tmp_path_factory):
  """(torch reference, path of its state dict as safetensors: the real names and shapes)."""
  torch = pytest.importorskip("torch")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  torch.manual_seed(0)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # much faster than contended threads on a small shared CPU
  net = _torch_fid_inception()
  with torch.no_grad():  # BN away from its init, so every statistic matters
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  path = str(tmp_path_factory.mktemp("fid") / inception.INCEPTION_FILE)
  safetensors_torch.save_file(net.state_dict(), path)  # ~95 MB, 566 tensors
  yield net, path
  torch.set_num_threads(threads)


def test_inception_tensor_names_are_the_released_ones(torch_inception):
  net, _ = torch_inception
  names = {k: tuple(v.shape) for k, v in net.state_dict().items()
           if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
  assert inception.inception_tensor_shapes() == names
  assert len(names) == 470  # 94 BasicConv2d x (conv.weight + 4 BN tensors)


def test_inception_features_and_fid_match_torch(torch_inception):
  import torch  # pylint: disable=g-import-not-at-top
  net, path = torch_inception
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 24, 32, 3)).astype(np.uint8)  # non-square: resize checked
  with torch.no_grad():
    ref = net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
  got = inception.inception_features(images, path, batch_size=2)
  assert got.shape == (4, 2048)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  # Fréchet distance over the 2048-d features (N < D: singular covariances). One BLAS
  # thread: 2048x2048 eigh is ~10x slower with threads contending on a small shared CPU.
  with threadpoolctl.threadpool_limits(1):
    got_fid = inception.fid_from_images(images[:2], images[2:], path, batch_size=2)
    assert got_fid == pytest.approx(frechet.frechet_distance(ref[:2], ref[2:]), rel=1e-3)


def test_resize_matches_torch_bilinear():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).uniform(size=(1, 37, 37, 3)).astype(np.float32)
  for size in (299, 20):  # up- and down-sampling, no antialiasing in either
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2),
                                          size=(size, size), mode="bilinear",
                                          align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(inception.resize_bilinear(x, size)), ref, atol=1e-5)


def test_missing_or_wrong_inception_file_is_a_clear_error(tmp_path):
  images = np.zeros((2, 8, 8, 1), np.uint8)
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
    inception.fid_from_images(images, images, str(tmp_path / inception.INCEPTION_FILE))
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  wrong = str(tmp_path / "wrong.safetensors")
  save_file({"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3), np.float32)}, wrong)
  with pytest.raises(ValueError, match="469 missing tensors"):
    inception.load_inception(wrong)
  with pytest.raises(ValueError, match="float images must lie in"):
    pretrained.to_unit_images(np.full((1, 8, 8, 3), 2.0))


# --- CLIP score against transformers ------------------------------------------------------------

TEXTS = ["A handwritten digit SEVEN", "the number 7", "an  eight, written by hand!",
         "it's 42 numbers_x ü", "sevens of digits " * 4]


def _tiny_vocab():
  """A valid byte-level BPE vocabulary: all bytes (plain and word-final) + merges of a few
  words, learned left to right, so words are whole tokens, partial merges or single bytes."""
  chars = list(clip_tokenizer._bytes_to_unicode().values())
  vocab, merges = chars + [c + "</w>" for c in chars], []
  for word in ("seven", "the", "number", "digit", "a", "handwritten", "an", "eight", "one"):
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    cur = parts[0]
    for nxt in parts[1:]:
      if (cur, nxt) not in merges:
        merges.append((cur, nxt))
        vocab.append(cur + nxt)
      cur += nxt
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  return {t: i for i, t in enumerate(vocab)}, merges


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
  """A random CLIPModel (every weight perturbed) saved by save_pretrained, with its tokenizer."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  folder = str(tmp_path_factory.mktemp("clip"))
  vocab, merges = _tiny_vocab()
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  eot = vocab["<|endoftext|>"]
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                       bos_token_id=vocab["<|startoftext|>"], eos_token_id=eot, pad_token_id=eot),
      vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=3, image_size=32, patch_size=8),
      projection_dim=16)
  torch.manual_seed(0)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(folder, safe_serialization=True)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
  return model, tokenizer, folder


def test_clip_tokenizer_matches_transformers(tiny_clip, monkeypatch):
  _, reference, folder = tiny_clip
  mine = clip_tokenizer.ClipTokenizer(folder)
  want = reference(TEXTS, max_length=16, truncation=True, padding="max_length")["input_ids"]
  np.testing.assert_array_equal(mine(TEXTS, 16), np.array(want))
  # Without the `regex` package the `re` fallback gives the same ids on these texts.
  monkeypatch.setitem(sys.modules, "regex", None)
  np.testing.assert_array_equal(clip_tokenizer.ClipTokenizer(folder)(TEXTS, 16),
                                np.array(want))


def test_clip_embeddings_and_score_match_transformers(tiny_clip):
  import torch  # pylint: disable=g-import-not-at-top
  model, _, folder = tiny_clip
  weights = os.path.join(folder, "model.safetensors")
  params, configs = clip.load_clip(weights)
  assert configs["vision"].num_heads == 3 and configs["text"].num_heads == 4  # config.json read
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 20, 28, 3)).astype(np.uint8)
  pixels = clip.clip_preprocess(images, 32)
  ids = clip_tokenizer.ClipTokenizer(folder)(TEXTS[:3], 16)
  with torch.no_grad():
    ref_img = model.get_image_features(
        pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).pooler_output.numpy()
    ref_txt = model.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output.numpy()
  got_img = np.asarray(clip.clip_image_embeds(params["vision"], configs["vision"], pixels))
  got_txt = np.asarray(clip.clip_text_embeds(params["text"], configs["text"], ids,
                                             clip_tokenizer.ClipTokenizer(folder).eot_id))
  np.testing.assert_allclose(got_img, ref_img, atol=1e-4)
  np.testing.assert_allclose(got_txt, ref_txt, atol=1e-4)
  unit = lambda e: e / np.linalg.norm(e, axis=-1, keepdims=True)
  expected = np.mean(np.maximum(100 * np.sum(unit(ref_img) * unit(ref_txt), -1), 0))
  assert clip.clip_score(images, TEXTS[:3], weights, folder) == pytest.approx(expected, abs=1e-3)


def test_clip_preprocess_follows_the_hf_image_processor():
  pytest.importorskip("transformers")
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # pylint: disable=g-import-not-at-top
  processor = CLIPImageProcessorPil(size={"shortest_edge": 32},
                                    crop_size={"height": 32, "width": 32})
  rng = np.random.default_rng(0)
  for shape in ((20, 28), (64, 48)):  # landscape and portrait: resize rule and centre crop
    blocks = rng.integers(0, 256, (2, shape[0] // 4, shape[1] // 4, 3)).astype(np.uint8)
    images = blocks.repeat(4, axis=1).repeat(4, axis=2)
    want = np.asarray(processor(list(images), return_tensors="np")["pixel_values"])
    got = clip.clip_preprocess(images, 32).transpose(0, 3, 1, 2)
    assert np.mean(np.abs(got - want)) < 0.02  # PIL's uint8 rounding and edge handling only


def test_missing_clip_files_are_clear_errors(tmp_path, tiny_clip):
  _, _, folder = tiny_clip
  images = np.zeros((1, 8, 8, 1), np.uint8)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    clip.clip_score(images, ["a 1"], str(tmp_path / "model.safetensors"), folder)
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    clip.clip_score(images, ["a 1"], os.path.join(folder, "model.safetensors"), str(tmp_path))


def test_upsample_to_digits_is_nearest_neighbour():
  low = np.arange(2 * 4 * 4).reshape(2, 4, 4, 1) % 17
  up = dc.upsample_to_digits(low)
  assert up.shape == (2, 8, 8, 1)
  for y in range(8):
    for x in range(8):
      np.testing.assert_array_equal(up[:, y, x], low[:, y // 2, x // 2])
  eight = np.ones((1, 8, 8, 1), np.int32)
  np.testing.assert_array_equal(dc.upsample_to_digits(eight), eight)

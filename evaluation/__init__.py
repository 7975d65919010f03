"""Sample-quality measures: Fréchet distance, the digits classifier, Inception-v3 FID, CLIP
score, and the video measures.

  frechet.py            Fréchet distance between Gaussians fitted to two feature sets.
  digits_classifier.py  the offline measures for scikit-learn's digits: a small classifier's
                        features (digits FD) and predictions (class / prompt accuracy), and
                        the real digits it is trained and compared on.
  inception.py          FID with pytorch-fid's Inception-v3, from a weight file the user has.
  clip.py               CLIP score with a Hugging Face CLIPModel snapshot's towers;
  clip_tokenizer.py     its byte-level BPE tokenizer.
  pretrained.py         what the pretrained-network measures share: weight files, the image
                        format they accept, batched evaluation.
  video.py              moving-digit videos without downloads: per-frame prompt alignment,
                        motion direction from the centre-of-mass track, identity
                        consistency, a Fréchet distance in classifier + motion features
                        (not FVD).
  i3d.py                FVD with the I3D network, from a user-provided weight file.

Nothing here imports `launch/`: the measures are pure functions of arrays (and weight files).
"""

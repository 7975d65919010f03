r"""Does a trained text-to-video stage read the motion in its caption near pure noise? (run
by hand; the probe behind the README's "What decides the sign").

  python bench/video_mean_track.py --workdir runs/video \
      [--captions "the digit 3 moving left;the digit 3 moving right"] [--logsnr=-8,-4,-2]
      [--draws 64] [--step N]

Two measures, both on the EMA weights:

1. *The mean prediction's track.* At high noise the best x-hat is close to the data's mean
   clip for the caption (z carries almost no signal), so for "moving left" its centre of mass
   must run from right to left over the frames. For each caption and logsnr, x-hat is
   averaged over `--draws` pure-noise draws z ~ N(0, I) (the same draws for every caption)
   and the column (and row) of its centre of mass is printed per frame, beside the same
   track of the mean of the real training clips with that caption's motion. A net that
   ignores the motion words prints a flat track at the canvas centre.
2. *What the text is worth.* The mean squared error of x-hat against real training clips
   noised to each logsnr, with their captions and with empty text: the gap is how much the
   net gets out of the caption there.

Prints readable lines, then one JSON line with every number.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from evaluation import video as video_eval
from launch import setup as setup_lib
from launch import text_encoder as text_encoder_lib
from launch import workdir as workdir_lib
from launch.data import moving_digits
from vdm import losses


def mean_track(x) -> np.ndarray:
  """[F, 2] (row, col) centre of mass of the mean clip of x [N, F, H, W, 1] in [-1, 1]."""
  mean = (np.asarray(x, np.float64).mean(axis=0)[..., 0] + 1) / 2
  return video_eval.centres_of_mass(mean[None])[0]


def real_clips(source, num: int):
  """(x [num, F, H, W, C] in [-1, 1], the examples, their motion codes): the first `num`."""
  examples = [source[i] for i in range(min(num, len(source)))]
  x = losses.int_to_x(jnp.stack([e["video"] for e in examples]), source.num_levels)
  return x, examples, np.array([int(e["direction"]) for e in examples])


def denoise(model, z, logsnr: float, cond: dict):
  """x-hat of the net at one logsnr for every example of z."""
  return model.denoise(z, jnp.full((z.shape[0],), logsnr), model.sampling_cond(cond, z.shape[0])).x


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--captions", default="the digit 3 moving left;the digit 3 moving right;"
                                       "the digit 3 moving up")
  p.add_argument("--logsnr", default="-8,-4,-2")
  p.add_argument("--draws", type=int, default=64)
  p.add_argument("--real", type=int, default=256, help="real clips for the MSE and means")
  args = p.parse_args()
  logsnrs = [float(v) for v in args.logsnr.split(",")]
  model, config = workdir_lib.load_ema_model(args.workdir, args.step)
  encoder = text_encoder_lib.load_text_encoder(config.data.t5, max_length=config.data.max_length)
  source = setup_lib.data_source(config, "train", args.workdir)
  x_real, examples, directions = real_clips(source, args.real)
  result = {"workdir": args.workdir, "tracks": [], "mse": []}

  # --- 1. the mean prediction's track against the data's ---------------------------------
  z = jax.random.normal(jax.random.PRNGKey(0), (args.draws,) + tuple(model.image_shape))
  for caption in args.captions.split(";"):
    emb, mask = encoder([caption] * args.draws)
    cond = {"text_emb": jnp.asarray(emb), "text_mask": jnp.asarray(mask)}
    same = directions == moving_digits.direction_of_caption(caption)
    data = mean_track(x_real[same]) if same.any() else None
    if data is not None:
      print(f"{caption!r:32} data          cols {np.round(data[:, 1], 1)} rows {np.round(data[:, 0], 1)}")
    row = {"caption": caption, "data": None if data is None else data.tolist(), "net": {}}
    for logsnr in logsnrs:
      track = mean_track(denoise(model, z, logsnr, cond))
      print(f"{caption!r:32} logsnr {logsnr:5.1f}  cols {np.round(track[:, 1], 1)} "
            f"rows {np.round(track[:, 0], 1)}", flush=True)
      row["net"][str(logsnr)] = track.tolist()
    result["tracks"].append(row)

  # --- 2. what the text is worth: MSE with and without the caption -----------------------
  text = {"text_emb": jnp.stack([e["text_emb"] for e in examples]),
          "text_mask": jnp.stack([e["text_mask"] for e in examples])}
  empty = {k: jnp.zeros_like(v) for k, v in text.items()}
  eps = jax.random.normal(jax.random.PRNGKey(1), x_real.shape)
  for logsnr in logsnrs:
    alpha, sigma = jax.nn.sigmoid(logsnr) ** 0.5, jax.nn.sigmoid(-logsnr) ** 0.5
    z_real = alpha * x_real + sigma * eps
    mse = {k: float(jnp.mean((denoise(model, z_real, logsnr, c) - x_real) ** 2))
           for k, c in (("text", text), ("no_text", empty))}
    mse["data_mean"] = float(jnp.mean((x_real - x_real.mean(axis=0)) ** 2))
    print(f"logsnr {logsnr:5.1f}  MSE with text {mse['text']:.4f}  without {mse['no_text']:.4f}"
          f"  (the data mean's: {mse['data_mean']:.4f})")
    result["mse"].append({"logsnr": logsnr, **mse})
  print(json.dumps(result))


if __name__ == "__main__":
  main()

r"""Encode every caption of a split with T5 once, and store the embeddings beside the images.

  python -m launch.encode_text --captions digits --split train --out DIR \
      [--t5 hf:/path/to/t5-v1_1-xxl | --t5 tiny] [--tokenizer default|PATH] \
      [--max_length 128] [--batch_size 64]

The files written and how training reads them: launch/data/text_cache.py. The encoders
(`--t5`): launch/text_encoder.py. Run it on every host (one process each, via
`launch.distributed`): each process encodes its own examples, and a rerun resumes where a
run stopped.

OFFLINE DEFAULT: `--t5 tiny` is a RANDOMLY INITIALISED tiny T5 encoder with the offline
digits tokenizer (imagen.tokenizer.default_tokenizer). It runs with no download and is
logged as such; its embeddings identify a caption but carry no language knowledge.
"""

import jax
from absl import app, flags

from launch import distributed
from launch import metric_writer
from launch import text_encoder as text_encoder_lib
from launch.data import captions as captions_lib
from launch.data import text_cache


def encode_from_flags(f) -> str:
  """The command's work, given parsed absl FlagValues (tests pass their own)."""
  process_index = jax.process_index() if f.process_index is None else f.process_index
  process_count = jax.process_count() if f.process_count is None else f.process_count
  source = captions_lib.get_caption_source(f.captions, f.split, f.data_dir)
  text_encoder = text_encoder_lib.load_text_encoder(
      f.t5, max_length=f.max_length, tokenizer=f.tokenizer, seed=f.seed)
  return text_cache.encode_split(source, f.out, f.split, text_encoder,
                                 captions_name=f.captions, process_index=process_index,
                                 process_count=process_count, batch_size=f.batch_size)


def define_flags(flag_values=None):
  """The command's flags, on absl's global FLAGS unless given a FlagValues."""
  fv = {"flag_values": flag_values} if flag_values is not None else {}
  flags.DEFINE_string("captions", "digits", "Caption source: digits, jsonl:PATH or a tfds "
                      "name (launch.data.captions.get_caption_source).", **fv)
  flags.DEFINE_string("split", "train", "Split to encode.", **fv)
  flags.DEFINE_string("out", None, "Cache directory.", required=True, **fv)
  flags.DEFINE_string("data_dir", None, "tfds data_dir (default $TFDS_DATA_DIR).", **fv)
  flags.DEFINE_string("t5", "tiny", "hf:/dir for a Hugging Face T5 checkpoint, t5x:/dir@xxl "
                      "for a T5X one, or a preset name for a RANDOM encoder (tiny: the "
                      "offline default).", **fv)
  flags.DEFINE_string("tokenizer", None, "'default' (offline digits vocabulary) or a "
                      "sentencepiece .model path; default: the checkpoint's spiece.model, or "
                      "'default' for random presets.", **fv)
  flags.DEFINE_integer("max_length", 128, "Tokens per caption (T5 length L).", **fv)
  flags.DEFINE_integer("batch_size", 64, "Captions per encoder call.", **fv)
  flags.DEFINE_integer("seed", 0, "Init seed of a random (preset) encoder.", **fv)
  flags.DEFINE_integer("process_index", None, "Default: jax.process_index().", **fv)
  flags.DEFINE_integer("process_count", None, "Default: jax.process_count().", **fv)


def main(argv):
  del argv
  metric_writer.setup_logging()
  distributed.initialize()
  encode_from_flags(flags.FLAGS)


def run():
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()

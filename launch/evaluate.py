r"""Bits/dim of a split, for a trained workdir (EMA params of the latest checkpoint by default).

  python -m launch.evaluate --workdir runs/digits [--split test] [--step N] [--no_ema]
      [--num_time_samples K] [--method ode --ode_steps 100]

The config is the one saved beside the checkpoint, so the model is rebuilt exactly; results
are printed and appended to workdir/eval_results.jsonl.
"""

import json

import jax
from absl import flags

from launch import checkpoint as checkpoint_lib
from launch import config_flags, fs
from launch import workdir as workdir_lib
from launch import distributed
from launch import metric_writer

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: config.data.eval_split).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_EMA = flags.DEFINE_bool("ema", True, "Evaluate the EMA params (--no_ema: the raw params).")
_K = flags.DEFINE_integer("num_time_samples", None, "(t, eps) draws per example.")
_METHOD = flags.DEFINE_enum("method", "vlb", ["vlb", "ode"], "Likelihood from the VLB or from "
                            "the probability-flow ODE (dequantized; Hutchinson trace).")
_ODE_STEPS = flags.DEFINE_integer("ode_steps", 100, "RK4 steps of the ODE (method=ode).")
_HUTCHINSON = flags.DEFINE_enum("hutchinson", "rademacher", ["rademacher", "gaussian"],
                                "Trace estimator noise (method=ode).")
_MAX = flags.DEFINE_integer("max_examples", None, "Evaluate only the first N examples.")
for _name, _example in (("num_time_samples", 4), ("ode_steps", 100), ("max_examples", 1000)):
  flags.register_validator(_name, lambda n: n is None or n >= 1,
                           f"--{_name} must be a positive number, e.g. --{_name} {_example}.")


def main(argv):
  del argv
  metric_writer.setup_logging()
  checkpoint_lib.require_checkpoint(_WORKDIR.value, _STEP.value)
  distributed.initialize()
  setup, state, ckpt = workdir_lib.load_workdir(_WORKDIR.value, _STEP.value, {
      "eval.num_time_samples": _K.value, "eval.max_examples": _MAX.value})
  config = setup.config
  step = int(jax.device_get(state["step"]))
  split = _SPLIT.value or config.data.eval_split
  result = workdir_lib.evaluate_bpd(setup, state["ema" if _EMA.value else "params"], split=split,
                                rng=jax.random.key(config.seed + 2), method=_METHOD.value,
                                **({"num_steps": _ODE_STEPS.value,
                                    "hutchinson": _HUTCHINSON.value}
                                   if _METHOD.value == "ode" else {}))
  result.update(step=step, split=split, ema=_EMA.value, method=_METHOD.value,
                num_time_samples=config.eval.num_time_samples)
  print(json.dumps(result))
  if distributed.is_main_process():
    fs.append_line(fs.join(_WORKDIR.value, "eval_results.jsonl"), json.dumps(result))
  ckpt.close()


def run():
  config_flags.run_main(main, checkpoint_lib.CheckpointError)


if __name__ == "__main__":
  run()

"""The family registry: `get_family(config.family)` for the trainer and the entry points.

One module per family (vdm, imagen, video, distill); the distillation family is built over the
others, since a student is trained on its teacher's family's data and model.
"""

from launch.families import distill, imagen, vdm, video
from launch.families.base import Family, compute_dtype, device_batch

FAMILIES = {"vdm": vdm.VDM, "imagen": imagen.IMAGEN, "video": video.VIDEO}
FAMILIES["distill"] = distill.make_family(dict(FAMILIES))

__all__ = ["Family", "FAMILIES", "compute_dtype", "device_batch", "get_family"]


def get_family(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f"unknown family {name!r}; choose one of {sorted(FAMILIES)}")
  return FAMILIES[name]

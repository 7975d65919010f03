"""Continuous-time diffusion in JAX/Flax: VDM, Imagen cascades and distillation."""
from setuptools import find_packages, setup

setup(
    name="vdiff",
    version="0.1.0",
    description="VDM, Imagen and diffusion distillation in JAX/Flax NNX, sharded from one CPU to a TPU pod",
    python_requires=">=3.11",
    packages=find_packages(include=["vdm*", "imagen*", "distill*", "evaluation*", "launch*",
                                    "configs*"]),
    package_data={"imagen": ["assets/*.model"], "launch": ["scripts/*.sh"]},
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "tensorflow-datasets==4.9.10",
        "ml-collections==1.1.0",
        "numpy==2.4.6",
        "scipy==1.17.1",
        "scikit-learn==1.9.1",
        "pillow==13.0.0",
        "tensorboardX==2.6.5",
        "safetensors==0.8.0",
        "sentencepiece==0.2.3",
        "absl-py==2.5.1",
        "regex==2026.5.9",            # CLIP's BPE pre-tokenizer (evaluation/clip_tokenizer.py)
        "gcsfs==2026.10.1",           # gs:// paths through etils.epath (launch/fs.py)
        "av==18.1.0",                 # PyAV (FFmpeg + libx264): video files in, MP4 out
    ],
    extras_require={
        # Test-only references: diffusers' DDIM scheduler (needs torch; the CPU wheel).
        # transformers: the PyTorch T5 encoder and tokenizer our T5 is checked against.
        # libtpu: `launch.aot` and its test compile for TPU slices on a CPU-only machine.
        # gcp-storage-emulator: a local GCS API for the gs:// tests (tests/gcs_emulator.py).
        # pytest-xdist: the suite runs on two workers (pytest.ini).
        "test": ["pytest==9.0.3", "pytest-xdist==3.8.0", "torch==2.13.0", "diffusers==0.42.1", "transformers==5.23.0",
                 "libtpu==0.0.42.1", "gcp-storage-emulator==2026.7.19"],
        # On a Cloud TPU VM, or anywhere for ahead-of-time compilation (python -m launch.aot).
        "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.1"],
        # NVIDIA GPUs (CUDA 12 wheels from the package index, no local CUDA install needed).
        "cuda12": ["jax[cuda12]==0.10.2"],
    },
    entry_points={
        "console_scripts": [
            "vdiff-train=launch.train:run",
            "vdiff-evaluate=launch.evaluate:run",
            "vdiff-sample=launch.sample:run",
            "vdiff-encode-text=launch.encode_text:run",
            "vdiff-sample-cascade=launch.sample_cascade:run",
            "vdiff-evaluate-cascade=launch.evaluate_cascade:run",
            "vdiff-distill=launch.distill:run",
            "vdiff-aot=launch.aot:run",
        ],
    },
)

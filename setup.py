"""jaxpref: learning from human and AI preferences in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="jaxpref",
    version="0.1.0",
    description="JAX/Flax framework for learning from human and AI preferences",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["jaxpref", "jaxpref.*"]),
    package_data={"jaxpref.data": ["tiny/*.jsonl", "tiny/*.model", "tiny/*.txt", "tiny/*.md"]},
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "chex>=0.1.90",
        "absl-py>=2.1",
        "sentencepiece>=0.2,<0.3",
        "tokenizers>=0.20,<1",  # Hugging Face tokenizer.json (jaxpref/data/tokenizer.py)
        "jinja2>=3.1.6",  # chat templates; older releases have sandbox escapes
        "numpy>=1.26",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "safetensors>=0.8,<1",
        # Hub ids in --init_from/--tokenizer/--train_data: the Hub cache (jaxpref/data/hub.py).
        "huggingface_hub>=1.0,<3",
        "pyarrow>=15",
        # jaxpref-data prepare / prepared training data (no TensorFlow needed).
        "tensorflow-datasets>=4.9.10,<5",
        "array-record>=0.8.6",
        "grain>=0.2.18,<0.3",
        # gs:// workdirs, data and models (jaxpref/paths.py): etils' epath is the path library
        # orbax writes through; gcsfs is its GCS backend without TensorFlow.
        "etils[epath]>=1.7",
        "gcsfs>=2024.2",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "transformers>=5.0,<6",
                 "peft>=0.21,<1",  # PEFT adapter export (tests/models/test_hf_export_formats.py)
                 "gcp-storage-emulator>=2024.8"],  # the gs:// tests' local GCS (tests/gcs_util.py)
        "tpu": ["jax[tpu]>=0.10,<0.11"],
        "gpu": ["jax[cuda12]>=0.10,<0.11"],
    },
    entry_points={"console_scripts": [
        "jaxpref-train=jaxpref.main:run",
        "jaxpref-sweep=jaxpref.sweep:run",
        "jaxpref-convert=jaxpref.models.convert:run",
        "jaxpref-eval=jaxpref.eval.reward_eval:run",
        "jaxpref-strength=jaxpref.eval.strength:run",
        "jaxpref-data=jaxpref.data.cli:run",
        "jaxpref-generate=jaxpref.eval.generate:run",
        "jaxpref-winrate=jaxpref.eval.win_rate:run",
    ]},
)

"""Packaging for attn-fast.

`kernels/` (Triton only) is installed as `attn_fast.kernels` through a package_dir mapping, so that no top-level
module called `kernels` is created (an unrelated PyPI package already owns that name).
"""
from setuptools import setup

SEQ2SEQ_REQUIRES = ["babel>=2.10", "sacrebleu>=2.0", "tqdm", "matplotlib"]

setup(
    name="attn-fast",
    version="0.1.0",
    description="Fused Triton kernels for additive (Bahdanau) attention, with a drop-in layer and a PyTorch reference",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["attn_fast", "attn_fast.kernels", "attn_fast.seq2seq"],
    package_dir={"attn_fast": "attn_fast", "attn_fast.kernels": "kernels"},
    install_requires=[
        # 2.6 is the first release with torch.library.triton_op; no upper pin.
        "torch>=2.6",
        "triton; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        # The Seq2Seq example model (attn_fast.seq2seq): locale data for the dates task, BLEU for TSV data,
        # progress bars for training, alignment heatmaps.
        "seq2seq": SEQ2SEQ_REQUIRES,
        "test": ["pytest", "pytest-benchmark", "hypothesis", *SEQ2SEQ_REQUIRES],
    },
    entry_points={"console_scripts": ["attn-fast = attn_fast.cli:main"]},
)
